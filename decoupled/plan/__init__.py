"""The cost model of training a network on a cluster, and `decoupled plan` on it (docs/plan.md).

model.py    the layout cost model and its searches (pure): dist.placement = "auto", the bench's
            pipeline split and the planner share it
measure.py  the measurements it runs on (stages and a collective passed in: no job config, no
            process group); memory counted by memory.ExactMemory, as the bench counts it
methods.py  each training method's samples/s, exact memory, link bytes and best layout (pure)
measure_job.py  the planner's one measurement of a job (reads the config)
cli.py, report.py  the command, its table and figure; compare.py  plan.json joined with bench.json
Nothing here imports the bench.
"""
