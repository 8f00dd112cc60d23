"""Study drivers: scripts that train and measure sets of runs built from the config files."""
