"""The recipes (`trl-refine midtrain|posttrain|testtime`, or `accelerate launch recipes/<name>.py`); installed
with the package as ``trl_refine.recipes`` together with their YAML configs."""
