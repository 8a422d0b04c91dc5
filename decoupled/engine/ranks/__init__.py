"""The decoupled engine across torchrun ranks.

world.py     process groups and object collectives (start-up agreement, the final report)
setup.py     what a rank does before it trains (data meta, placement, dry run, resume, links)
transport.py point-to-point messages on one pipeline edge
receiver.py  the reader threads of a rank's upstream links
feed.py      where a downstream rank's messages come from, in what order: SyncFeed (the FIFO) or
             AsyncFeed (the replay buffer + control queue), chosen once at setup
budget.py    what a block's epoch is: UpstreamEpochs (the stream's) or OwnSteps (replay.budget="steps")
replay.py    the bounded replay buffer of async mode
sources.py   where messages come from without an upstream: the dataset, the cascade hand-off cache
evaluation.py per-rank test scoring and the running head ensemble
pipeline.py  the rank's loop over its feed and budget, and the per-message handlers
"""
