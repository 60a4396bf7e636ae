"""Miles launchers, importable as `miles.launchers`: the local executor and miles-submit."""
