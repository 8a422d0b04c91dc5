"""The decoupled engine across torchrun ranks.

world.py     process groups and object collectives (start-up agreement, the final report)
setup.py     what a rank does before it trains (data meta, placement, dry run, resume, links)
transport.py point-to-point messages on one pipeline edge
receiver.py  the upstream link's reader thread (sync FIFO or async replay buffer + control queue)
replay.py    the bounded replay buffer of async mode
sources.py   where messages come from without an upstream: the dataset, the cascade hand-off cache
evaluation.py per-rank test scoring and the running head ensemble
pipeline.py  the per-message handlers and the rank's loop
"""
