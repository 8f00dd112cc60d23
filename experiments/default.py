"""The embedded default: a ~4M-parameter Llama-style model on the shipped Python-docs corpus.

Trains in a few minutes on one 2-core CPU and shows the loss fall from ln(vocab) ~ 8.3.

    python -m llm.train --config=experiments/default.py --workdir=/tmp/default

Every field can be overridden on the command line, e.g. `--config.model.num_layers=2`.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # initialization and data order
    c.steps = 300  # optimizer steps of the run
    c.batch_size = 16  # global batch, in sequences
    c.grad_accum_steps = 1  # micro-batches per step (batch_size must divide evenly)
    c.seq_len = 256  # tokens per training sequence
    c.log_every = 10  # steps between metrics.jsonl records
    c.eval_every = 100  # steps between evaluations (and at the end); 0 disables
    c.eval_batches = 8  # validation batches per evaluation
    c.checkpoint_every = 100  # steps between checkpoints (and at the end); 0 disables
    c.keep_checkpoints = 2  # the last N checkpoints kept
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.fallback_to_previous = False  # restore the previous step if the latest is corrupt
    c.init_from = ""  # "" | workdir:DIR[@STEP] | hf:DIR: start from these weights, fresh optimizer
    c.resume_policy = "strict"  # strict | allow_changes: a resume changing what is trained
    c.resume_schedule = "original"  # original | stretch: learning rates when a resume adds steps
    c.nonfinite = "stop"  # stop | skip: a step with a non-finite loss, gradient or parameter
    c.loss_spike = ml_collections.ConfigDict()  # skip a step whose loss > mean + sigmas·std
    c.loss_spike.window = 0  # of the last `window` accepted losses; 0 disables
    c.loss_spike.sigmas = 6.0  # a loss above mean + sigmas * std of the window is skipped
    c.profile = ml_collections.ConfigDict()  # a jax.profiler trace: TensorBoard or Perfetto
    c.profile.start_step = -1  # first step traced into WORKDIR/profile/; -1 = no trace
    c.profile.steps = 3  # steps traced
    c.tracker = ""  # "wandb": also log to Weights & Biases (extra: pip install -e ".[wandb]")
    c.debug = ml_collections.ConfigDict()
    c.debug.log_batch_hashes = False  # WORKDIR/batch_hashes.jsonl: a SHA-256 per global batch
    c.debug.log_activation_rms = False  # metrics.jsonl: rms/{embedding,attention,mlp,...} (muP)
    c.z_loss = 1e-4  # weight of log(Z)^2 in the loss (PaLM); 0 disables
    # Output projection + cross-entropy: "plain" materializes the [batch, seq, vocab] logits;
    # "chunked" (kernels/cross_entropy) never does, tiling them seq_block x vocab_chunk (README).
    c.loss = ml_collections.ConfigDict()
    c.loss.impl = "plain"  # plain | chunked (above); plain is faster on CPU at vocab 4096
    c.loss.vocab_chunk = 4096  # chunked: vocabulary columns per tile (ragged last chunk allowed)
    c.loss.seq_block = 256  # chunked: sequence positions per tile (> seq_len: one block)
    c.sample_prompt = "The list type"  # decoded at the end of training; "" to skip
    c.sample_tokens = 48  # tokens sampled after training

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "text_corpus"  # any tfds name with a text feature, e.g. "lm1b", "c4/en"
    c.data.text_key = "text"  # the feature holding the text
    c.data.text_dir = ""  # a local directory of .txt files to read instead (text_corpus builder)
    c.data.data_dir = ""  # "" = data.pipeline.default_data_dir()
    c.data.tokenizer = ""  # "": the shipped sentencepiece model; a .model file; an HF tokenizer dir
    c.data.train_split = "train"  # tfds split to train on
    c.data.eval_split = "validation"  # tfds split to evaluate on

    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = 4096  # >= the tokenizer's vocabulary (larger = padded)
    c.model.num_layers = 4  # transformer blocks
    c.model.embed_dim = 256  # D, the residual width
    c.model.num_heads = 4  # H query heads
    c.model.num_kv_heads = 2  # K key/value heads (grouped-query attention; divides H)
    c.model.head_dim = placeholder(int)  # None = embed_dim // num_heads
    c.model.mlp_dim = 768  # F, the SwiGLU hidden width
    c.model.max_seq_len = (
        2048  # longest sequence the model accepts (RoPE has no table, this is a guard)
    )
    c.model.rope_theta = 10_000.0  # RoPE base frequency
    # RoPE scaling (llm.model.config.RopeScaling), as transformers' rope_type: train, evaluate and
    # sample beyond original_max_position. none = plain RoPE (the other fields are then unused).
    c.model.rope_scaling = ml_collections.ConfigDict()
    c.model.rope_scaling.type = "none"  # none | linear | dynamic (NTK) | yarn | llama3
    c.model.rope_scaling.factor = 1.0  # context extension factor (>= 1)
    c.model.rope_scaling.original_max_position = 2048  # the pretraining context length
    c.model.rope_scaling.low_freq_factor = 1.0  # llama3: wavelengths > original / this are scaled
    c.model.rope_scaling.high_freq_factor = 4.0  # llama3: wavelengths < original / this are kept
    c.model.rope_scaling.beta_fast = 32.0  # yarn: rotations where interpolation stops
    c.model.rope_scaling.beta_slow = 1.0  # yarn: rotations where interpolation is full
    c.model.rope_scaling.attention_factor = placeholder(float)  # yarn: None = 0.1 ln(factor) + 1
    c.model.rope_scaling.truncate = True  # yarn: round the ramp's ends to whole dimensions
    c.model.qkv_bias = False  # biases on the q, k, v projections (Qwen2)
    c.model.qk_norm = False  # RMSNorm of each query and key head before RoPE (Qwen3)
    # Gemma 3's features (each off by default; llm.hf loads them all together).
    c.model.rope_local_theta = placeholder(float)  # RoPE base of "sliding" layers; None = shared
    c.model.embed_scale = False  # embeddings times sqrt(embed_dim)
    c.model.norm_plus_one = False  # RMSNorms scale by (1 + w), w initialized at 0
    c.model.post_norms = False  # RMSNorm of the attention and MLP outputs before each residual add
    c.model.mlp_activation = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU)
    c.model.query_pre_attn_scalar = placeholder(float)  # scores / sqrt(this); None = head_dim
    c.model.final_logit_softcap = placeholder(float)  # cap * tanh(logits / cap); None = off
    c.model.norm_eps = 1e-6  # RMSNorm epsilon
    c.model.tie_embeddings = True  # output projection = embedding table transposed
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on GPU/TPU
    c.model.param_dtype = "float32"  # parameter (and optimizer state) dtype
    c.model.scan_layers = (
        False  # one compiled block scanned over layers (fast compiles for deep models)
    )
    c.model.remat = "none"  # none | full | dots | dots_no_batch: what the backward pass recomputes
    c.model.attention_impl = placeholder(
        str
    )  # None = fastest for the backend; see kernels.attention
    # Mixture of experts (llm.model.moe): MoE layers replace the dense MLP on a schedule.
    c.model.moe = ml_collections.ConfigDict()
    c.model.moe.num_experts = 0  # 0 = dense everywhere
    c.model.moe.top_k = 2  # experts per token
    c.model.moe.expert_mlp_dim = 768  # hidden width of each expert's SwiGLU
    c.model.moe.every = 1  # MoE in every `every`-th layer from first_dense_layers on
    c.model.moe.first_dense_layers = 0  # leading layers that stay dense
    c.model.moe.router = "softmax_topk"  # softmax_topk (Mixtral) | sigmoid_topk (DeepSeek-V3)
    c.model.moe.dispatch = "dropless"  # dropless (grouped matmul) | capacity (fixed buffers)
    c.model.moe.capacity_factor = 1.25  # capacity dispatch: slots = ceil(cf * tokens * k / E)
    c.model.moe.aux_loss_weight = 1e-2  # Switch load-balancing loss
    c.model.moe.z_loss_weight = 1e-3  # router z-loss
    c.model.moe.bias_update_rate = 0.0  # auxiliary-loss-free balancing step; 0 = off
    c.model.moe.num_shared_experts = 0  # dense experts every token also uses
    c.model.moe.shared_expert_gate = False  # Qwen2-MoE: shared output * sigmoid(x @ w_gate)
    # Attention schedule over layers (llm/model/patterns.py): pattern names, "*N" repeats,
    # repeated to num_layers, e.g. "dense", "sliding", "sliding*5,dense" (5 local : 1 global).
    c.model.attention_pattern = "dense"  # per-layer schedule, e.g. "sliding*5,dense" (above)
    c.model.attention_window = 128  # W: keys a "sliding"/"local_global"/"dilated" query spans
    c.model.attention_global = 16  # G: leading tokens every "local_global" query sees
    c.model.attention_stride = 8  # S: "strided" and "dilated" step between keys
    c.model.attention_chunk = 128  # C: "chunked" attends causally within chunks of C tokens
    c.model.attention_nsa_block = 16  # "nsa": tokens per compressed and per selected block
    c.model.attention_nsa_selected = 4  # "nsa": past blocks each query selects besides its own
    # Context parallelism (mesh.sequence > 1): "ring" passes K/V blocks around the devices
    # (zig-zag load balanced; seq_len a multiple of 2 x mesh.sequence), "all_gather" gathers them.
    c.model.context_parallel = "ring"  # ring | all_gather (above)
    # muP (llm.model.mup, README): hyperparameters tuned at mup_base_width carry over to wider
    # models; init, learning rates, logits and attention scale follow the width multiplier.
    c.model.parametrization = "sp"  # sp (standard) | mup (maximal update)
    c.model.mup_base_width = placeholder(int)  # mup: the embed_dim the hyperparameters suit
    c.model.mup_base_head_dim = placeholder(int)  # mup: None = mup_base_width // num_heads
    c.model.mup_readout = "multiplier"  # mup: logits x base/width | zero (untied unembed at 0)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 3e-3  # peak learning rate (after warmup)
    c.optimizer.warmup_steps = placeholder(int)  # None = steps // 10 (30 of the 300 steps)
    c.optimizer.min_learning_rate_ratio = 0.1  # cosine decays to this fraction of the peak
    c.optimizer.weight_decay = 0.1  # AdamW decoupled weight decay (not on norm scales)
    c.optimizer.b1 = 0.9  # Adam first-moment decay
    c.optimizer.b2 = 0.95  # Adam second-moment decay
    c.optimizer.eps = 1e-8  # Adam epsilon
    c.optimizer.grad_clip_norm = 1.0  # 0 disables clipping

    # Device mesh: one size may be -1 (all remaining devices); data x fsdp x ... = device count.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.stage = 1  # pipeline stages (config.pipeline): the stacked layers split; outermost
    c.mesh.data = -1  # data parallel: replicated parameters, split batch
    c.mesh.fsdp = 1  # fully sharded data parallel: parameters and optimizer state split on embed
    c.mesh.expert = 1  # expert parallel: MoE experts split, and the batch split like data
    c.mesh.sequence = 1  # context parallel: sequence split, attention by model.context_parallel
    c.mesh.tensor = 1  # tensor parallel (Megatron): heads, mlp and vocab split; innermost axis
    # Logical axis -> mesh axes; the only place that says where a tensor dimension lives.
    c.axis_rules = (
        ("batch", ("data", "fsdp", "expert")),
        ("expert", "expert"),
        ("seq", "sequence"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("layers", "stage"),
    )
    # Pipeline parallelism (llm.parallel.pipeline; README), used when mesh.stage > 1 with
    # model.scan_layers=True; bubble fraction (S-1)/(v·M+S-1), zb_h1's (S-1)/(3M+S-1).
    c.pipeline = ml_collections.ConfigDict()
    # gpipe | 1f1b (<= S microbatches in flight) | interleaved_1f1b | zb_h1 (zero bubble)
    c.pipeline.schedule = "1f1b"
    c.pipeline.microbatches = 4  # M per step (per accumulation step); 1f1b needs M >= mesh.stage
    c.pipeline.virtual_stages = 1  # v: layer chunks per stage; interleaved_1f1b only (>= 2)

    # LoRA / QLoRA (llm.model.lora, README "Post-training"): frozen base, trained low-rank adapters.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # adapter rank r; 0 = off (every parameter trained)
    c.lora.alpha = 16.0  # updates scaled by alpha / rank (PEFT's lora_alpha)
    c.lora.dropout = 0.0  # dropout on the adapters' input, training steps only
    c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")  # of those and "experts" (MoE)
    c.lora.quantize = "none"  # QLoRA: none | int8 | nf4, storage of the frozen base weights
    # Quantization (llm.model.quant, README): fake-quantized matmuls in training (QAT);
    # llm.quantize stores trained weights quantized (PTQ). Simulated in float32 on CPU.
    c.quant = ml_collections.ConfigDict()
    c.quant.mode = "none"  # none | int8 (weights+activations) | fp8 (e4m3/e5m2) | int4_weights
    c.quant.targets = "attention,mlp,experts"  # comma-separated: attention, mlp, experts, head
    c.quant.group_size = 128  # int4: weights per scale along the input width (divides it)
    c.quant.weights = ""  # "" | int8 | int4: weights stored quantized (set by llm.quantize)

    # Post-training (llm/training/post_training.py, README "Post-training"): fine-tune from
    # init_from on JSONL records instead of pretraining text.
    c.post_training = ml_collections.ConfigDict()
    c.post_training.format = "pretrain"  # pretrain | sft (prompt/response) | preference (DPO...)
    c.post_training.train_file = ""  # sft, preference: JSONL records trained on
    c.post_training.eval_file = ""  # sft, preference: JSONL records evaluated on
    c.post_training.overlong = "truncate"  # truncate | drop: a record longer than seq_len
    c.post_training.loss = "dpo"  # preference: dpo | ipo | simpo
    c.post_training.beta = 0.1  # preference: inverse temperature of the implicit rewards
    c.post_training.simpo_gamma = 0.5  # simpo: target reward margin
    # lm-evaluation-harness tasks scored every eval_every steps (llm/harness; extra: eval), in
    # metrics.jsonl and TensorBoard as harness/TASK/METRIC. Shipped: llm/harness/tasks/*.yaml.
    c.eval = ml_collections.ConfigDict()
    c.eval.harness_tasks = ""  # comma-separated lm-eval task names, e.g. "llm_lab_cloze"; "" = off
    c.eval.harness_limit = 0  # documents per task; 0 = all
    c.eval.harness_include_path = ""  # another directory of lm-eval task YAML
    c.eval.harness_batch_size = 16  # rows per scoring batch (rounded up to the batch devices)
    c.eval.harness_max_length = 0  # longest scored window in tokens; 0 = seq_len
    # Compression (README): pruning (llm.training.prune) and distillation (llm.training.distill).
    c.prune = ml_collections.ConfigDict()
    c.prune.method = "none"  # none | magnitude (unstructured) | N:M semi-structured, e.g. 2:4
    c.prune.sparsity = 0.5  # magnitude: final fraction of zeros in each target weight, in [0, 1)
    c.prune.start = 0  # first step pruned (N:M: the step its pattern is chosen)
    c.prune.end = 0  # magnitude: the step `sparsity` is reached (cubic ramp from start)
    c.prune.targets = "attention,mlp,experts"  # of: attention, mlp, experts, embeddings
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ""  # "" (off) | workdir:DIR[@STEP] | hf:DIR: the frozen teacher
    c.distill.alpha = 0.5  # loss = alpha * CE + (1 - alpha) * T^2 * KL
    c.distill.temperature = 1.0  # T, softening teacher and student
    c.distill.kl = "forward"  # forward: KL(teacher || student) | reverse: KL(student || teacher)
    c.distill.cache = ""  # a directory by `python -m llm.distill_cache`: top-k teacher logits
    return c
