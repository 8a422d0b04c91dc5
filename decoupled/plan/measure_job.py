"""The planner's one measurement of a job (its config read here, as engine/ranks/placement.py reads it
for the engine): the dataset's shapes, throwaway stages, measure.profile on this machine's device, and
with --device-tflops the times replaced by FLOPs (methods.on_device)."""
from __future__ import annotations

import torch

from ..data import build_data
from ..device import resolve_device
from ..engine.build import build_rank_stages
from ..flops import stage_costs
from ..optim import build_optimizer
from .host import measure_host
from .measure import profile
from .methods import PlanError, Profile, on_device


def _layers(module: torch.nn.Module) -> int:
    """Modules holding parameters of their own: each launches its kernels."""
    return sum(1 for m in module.modules() if any(True for _ in m.parameters(recurse=False)))


def measure_job(cfg, args) -> tuple[Profile, dict]:
    """(the profile, plan.json's description of what was measured and how)."""
    try:
        data = build_data(cfg.data, cfg.train.seed)
    except OSError as e:
        raise PlanError(f"--config: the dataset cannot be read ({e}); set data.root (or --set data.name=digits)")
    shape, classes = data.input_shape, data.num_classes
    device = resolve_device(cfg.train.device)
    batch = cfg.data.batch_size
    b0 = args.measure_batch or batch

    def build():
        return build_rank_stages(cfg, shape, classes, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((b0, *shape), generator=g).to(device)
    y = torch.randint(0, classes, (b0,), generator=g).to(device)
    try:
        prof = profile(build, x, y, batch, device, lambda ps: build_optimizer(ps, cfg.optim, cfg.optim.lr),
                       classes=classes, codecs=tuple(dict.fromkeys([cfg.dist.wire_dtype, "float32", "int8"])),
                       powersgd_rank=getattr(args, "powersgd_rank", 4))
    except (RuntimeError, MemoryError) as e:  # out of memory, or a model whose step fails at this size
        raise PlanError(f"--measure-batch: the model could not be measured at batch {b0} on {device} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); measure at fewer rows, e.g. "
                        f"--measure-batch {max(2, b0 // 4)} (scaled to data.batch_size={batch})") from None
    info = {"config": str(args.config), "overrides": list(args.overrides), "model": cfg.model.name,
            "dataset": cfg.data.name, "batch_size": batch, "blocks": len(prof.fwd_s),
            "measured": {"device": str(device), "batch": b0, "torch": torch.__version__}}
    if args.device_tflops:
        stages = build()
        costs = [stage_costs(s, batch) for s in stages]
        last = len(stages) - 1
        layers = [_layers(s.block) + _layers(s.objective.head) * (j == last) for j, s in enumerate(stages)]
        tensors = sum(1 for s in stages for _ in s.block.parameters()) + \
            sum(1 for _ in stages[-1].objective.head.parameters())
        prof = on_device(prof, [c["step"] for c in costs],
                         [c["e2e_step"] + c["e2e_head"] * (j == last) for j, c in enumerate(costs)],
                         [c["forward"] + c["exit"] * (j == last) for j, c in enumerate(costs)],
                         layers, tensors, args.device_tflops, args.efficiency, args.launch_us * 1e-6)
        info["device"] = {"tflops": args.device_tflops, "efficiency": args.efficiency, "launch_us": args.launch_us}
        backend = "nccl (a device planned from FLOPs)"
    elif device.type == "cpu" and getattr(args, "host_terms", "measure") == "zero":
        backend = "gloo, host terms not measured (--host-terms zero): 0"
        prof.notes.append("--host-terms zero: the all-reduce's and the transport's host terms are 0, not measured")
    elif device.type == "cpu":  # gloo: the communication's host work, between two local processes (host.py)
        try:
            got = measure_host()
        except (RuntimeError, OSError) as e:
            raise PlanError(f"--host-terms: measuring gloo's host costs between two local processes failed ({e}); "
                            "plan without them with --host-terms zero") from None
        prof.host.allreduce, prof.host.send, prof.host.recv = (
            (got[k].fixed_s, got[k].s_per_byte) for k in ("allreduce", "send", "recv"))
        info["host_points"] = got["points"]
        backend = "gloo (measured between 2 local processes)"
    else:
        backend = f"{device.type}: the communication's host terms are not measured (0)"
        prof.notes.append(f"on {device.type} the all-reduce's and the transport's host terms are not measured: 0")
    h = prof.host
    # the host terms' constants (docs/plan.md, the model): frozen with the plan, so it can be re-checked
    info["constants"] = {
        "backend": backend,
        "allreduce_host": {"fixed_s": h.allreduce[0], "s_per_byte": h.allreduce[1],
                           "what": "CPU a rank spends per all-reduce call and per byte it sends in the ring "
                                   "(gloo's TCP copies and reductions; 0 on NCCL)"},
        "send_host": {"fixed_s": h.send[0], "s_per_byte": h.send[1],
                      "what": "CPU per transport message sent (transport.Link.send: pack, isend, its completion)"},
        "recv_host": {"fixed_s": h.recv[0], "s_per_byte": h.recv[1],
                      "what": "CPU per transport message received (transport.Link.recv: irecv, header, unpack)"},
        "codec": h.codec, "powersgd_s": h.powersgd_s, "powersgd_rank": h.powersgd_rank}
    # the frozen constants every prediction comes from (seconds per batch of data.batch_size, bytes)
    info["profile"] = {"step_s": prof.local.step_s, "fixed_s": prof.local.fixed_s, "e2e_fwd_s": prof.fwd_s,
                       "e2e_bwd_s": prof.bwd_s, "e2e_fixed_s": prof.e2e_fixed_s, "opt_s": prof.opt_s,
                       "block_exact_mem": prof.local_mem, "e2e_exact_mem": prof.e2e_mem,
                       "e2e_act_bytes": prof.e2e_act, "cut_numel": prof.numel, "e2e_param_bytes": prof.e2e_params}
    return prof, info
