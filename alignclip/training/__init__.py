"""The trainer's components, one concern per module (composed by ``loop``):

schedule (lr as a pure function of the step), optim (AdamW parameter groups), deepspeed_config (the DeepSpeed
config dict derived from the project config), engine (``deepspeed.initialize``), checkpoint (atomic step checkpoints, ``latest``, resume),
preemption (signal flag agreed across ranks), monitor (TensorBoard, train.log, progress bar), loop (the loop).
"""
