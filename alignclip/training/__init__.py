"""The trainer's components, one concern per module (composed by ``trainer``):

plan (the run resolved once: device, batch layout, fast path, data, caption embeddings, the resume decision and
its checks), parts (the data feed, the stop check and the periodic parts that own their schedules: evaluator,
logger, gap monitor, progress bar, checkpointer), schedule (lr as a pure function of the step), optim (AdamW
parameter groups), deepspeed_config (the DeepSpeed config dict derived from the project config), engine
(``deepspeed.initialize``), fast_path (the per-device speed switches), flops and peaks (model FLOPs per step and
device peaks, for MFU), components (the one process-group set-up and engine assembly, shared with the benchmarks),
checkpoint (atomic step checkpoints, ``latest``, resume), run_lock (one trainer per run directory), preemption
(signal flag agreed across ranks), monitor (TensorBoard, train.log, progress bar), trainer (``Stepper``: the step;
``Trainer``: the loop).
"""
