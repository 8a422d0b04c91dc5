"""Training engine. stage.py: what a worker owns for one block (block, objective, optimizer, RNG);
run.py: the state a loop works on, with metrics, evaluation and checkpoints hanging off it;
ranks/: the decoupled engine across torchrun ranks; cache.py, evaluate.py: pseudo-input caches,
test scoring. The trainers (their loops and epoch policies) are decoupled/trainers/."""
