"""plan.json as a table (stdout) and a figure (plan.png: samples/s against K per method, a panel per link)."""
from __future__ import annotations

from pathlib import Path

MiB = 2 ** 20


def _layout(r: dict) -> str:
    lay = r["layout"]
    text = f"blocks {[len(g) for g in lay['placement']]}"
    if max(lay["replicas"]) > 1:
        text += f" x ranks {lay['replicas']}"
    return text + (f", {lay['microbatches']} microbatches" if lay.get("microbatches") else "")


def table(result: dict) -> str:
    lines = [f"{result['model']} on {result['dataset']}, batch {result['batch_size']}, {result['blocks']} blocks; "
             f"measured on {result['measured']['device']} at batch {result['measured']['batch']}"
             + (f"; device {result['device']['tflops']:g} TFLOPS x {result['device']['efficiency']:g}"
                if result.get("device") else "")]
    lines += [f"  note: {n}" for n in result["notes"]]
    lines.append(f"{'link':>9} {'K':>3} {'method':13s} {'samples/s':>10} {'exact MiB':>10} {'link B/sample':>13}"
                 "  layout")
    for r in result["rows"]:
        head = f"{r['link']:>9} {r['ranks']:>3} {r['method']:13s}"
        if r.get("samples_per_s") is None:
            lines.append(f"{head} {'-':>10} {'-':>10} {'-':>13}  cannot run: {r['error']}")
            continue
        bound = "≥" if r.get("exact_mem_lower_bound") else " "
        lines.append(f"{head} {r['samples_per_s']:10.1f} {bound}{r['exact_train_mem_bytes'] / MiB:9.2f} "
                     f"{r['link_bytes_per_sample']:13.0f}  {_layout(r)}")
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    links = list(dict.fromkeys(r["link"] for r in result["sweep"]))
    fig, axes = plt.subplots(1, len(links), figsize=(5.5 * len(links), 4.2), squeeze=False)
    for ax, link in zip(axes[0], links):
        rows = [r for r in result["sweep"] if r["link"] == link and r.get("samples_per_s")]
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["ranks"], r["samples_per_s"]) for r in rows if r["method"] == method]
            ax.plot(*zip(*pts), marker="o", ms=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks K")
        ax.set_ylabel("predicted samples/s")
        ax.set_title(f"link {link}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    where = (f"{result['ranks_per_node']} ranks a node" if result.get("ranks_per_node") else
             f"{result['nodes']} nodes" if result.get("nodes") else "a node a rank")
    if where != "a node a rank":
        where += f", {result.get('intra_link', 'loopback')} within a node"
    dev = result.get("device")
    fig.suptitle(f"decoupled plan: {result['model']} on {result['dataset']}, batch {result['batch_size']}; {where}"
                 + (f"; {dev['tflops']:g} TFLOPS x {dev['efficiency']:g} (from FLOPs)" if dev else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
