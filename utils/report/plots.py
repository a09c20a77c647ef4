"""Per-layer figures of a saved parameter file: which formats the search chose, the exponent biases, and
each Linear's output MSE against MinMax. For block-scaled files (NVFP4, MX recipes) the baseline is round to nearest
and the middle panel shows what the recipe chose instead of the (fixed) format: the static clip of the activations'
dynamic block maxima, and whether a Linear's weight carries a rounding of its own (GPTQ) or searched block scales.

    python -m utils.report.plots search_result/FPQ_config_llama/W4A4E4_...pt [--out layers.png]

main.py --plot writes the same figure next to the results JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quant_layers.formats import exponent_bias_from_max
from utils.data.architecture import LAYOUTS
from utils.params import ParamFileError, load_params

MAX_TICKS = 80  # x tick labels beyond this many are thinned out


def block_and_module(name: str) -> tuple[int | None, str]:
    """(decoder block index, module) of a Linear's full name: "model.layers.3.self_attn.q_proj" -> (3, "q_proj");
    a Linear outside the decoder blocks (LAYOUTS), such as "lm_head", -> (None, "lm_head")."""
    module = name.rsplit(".", 1)[-1]
    for layers_path, _ in LAYOUTS:
        if name.startswith(layers_path + "."):
            index = name[len(layers_path) + 1:].split(".", 1)[0]
            if index.isdigit():
                return int(index), module
    return None, module


def layer_table(path: str | Path) -> list[dict]:
    """One row per quantized Linear in file order: name, block (decoder block index, None outside the blocks),
    module (the name's last part), formats, weight bias (median over rows), activation bias, MSE after search
    and with MinMax."""
    layers, _ = load_params(path)
    rows = []
    for name, p in layers.items():
        if getattr(p, "kind", None) != "linear" or p.weight_format is None or p.act_format is None:
            continue
        block, module = block_and_module(name)
        rows.append({
            "name": name,
            "block": block,
            "module": module,
            "weight_format": p.weight_format.name,
            "act_format": p.act_format.name,
            "weight_bias": float(exponent_bias_from_max(p.weight_format, p.weight_max_value.float()).quantile(0.5)),
            "act_bias": float(exponent_bias_from_max(p.act_format, p.act_max_value.float())),
            "mse": p.mse,
            "mse_minmax": p.mse_minmax,
            "blocks": p.weight_format.block is not None,
            "act_block_clip": 1.0 if p.act_block_clip is None else float(p.act_block_clip),
            "weight_rounding": "GPTQ codes" if p.weight_codes is not None else
            "searched block scales" if p.weight_block_scale is not None else "round to nearest",
        })
    return rows


def x_ticks(rows: list[dict]) -> tuple[list[int], list[str], str]:
    """Tick positions and labels of the Linear axis, and its title: a tick at the first Linear of each decoder
    block, labelled with the block's index, and one per Linear outside the blocks, labelled with its module;
    the title names the order of the Linears within a block (that of the block holding the most)."""
    positions, labels, blocks = [], [], {}
    for i, row in enumerate(rows):
        if row["block"] is None:
            positions.append(i)
            labels.append(row["module"])
        else:
            if row["block"] not in blocks:
                positions.append(i)
                labels.append(str(row["block"]))
            blocks.setdefault(row["block"], []).append(row["module"].removesuffix("_proj"))
    if len(positions) > MAX_TICKS:
        step = -(-len(positions) // MAX_TICKS)
        positions, labels = positions[::step], labels[::step]
    if not blocks:
        return positions, labels, "Linear, in model order"
    order = max(blocks.values(), key=len)
    return positions, labels, f"decoder block (its Linears in order {' '.join(order)}), in model order"


def layer_figure(path: str | Path):
    """The three-panel matplotlib Figure of `layer_table(path)`: output MSE, formats (block-scaled files: the
    activation clip and the weight's rounding), exponent biases per Linear."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = layer_table(path)
    if not rows:
        raise ParamFileError(f"{path} has no Linear with both weight and activation quantized: nothing to plot")
    index = range(len(rows))
    fig, axes = plt.subplots(3, 1, figsize=(max(8.0, len(rows) * 0.06), 9), sharex=True)
    blocks = all(r["blocks"] for r in rows)
    baseline = "round to nearest" if blocks else "MinMax"
    axes[0].semilogy(index, [r["mse_minmax"] for r in rows], ".", label=baseline, color="tab:gray")
    axes[0].semilogy(index, [r["mse"] for r in rows], ".", label="searched", color="tab:blue")
    axes[0].set_ylabel("output MSE")
    if blocks:
        kinds = ["round to nearest", "searched block scales", "GPTQ codes"]
        axes[1].plot(index, [r["act_block_clip"] for r in rows], "o", ms=3, label="activation block clip")
        axes[1].set_ylabel("clip (x block max)")
        twin = axes[1].twinx()
        twin.plot(index, [kinds.index(r["weight_rounding"]) for r in rows], "s", ms=2, color="tab:green",
                  label="weight rounding")
        twin.set_yticks(range(len(kinds)), kinds, fontsize=7)
        twin.set_ylim(-0.5, len(kinds) - 0.5)
        twin.legend(loc="lower left", fontsize=8, framealpha=0.7)
    else:
        names = sorted({r["weight_format"] for r in rows} | {r["act_format"] for r in rows})
        level = {n: i for i, n in enumerate(names)}
        axes[1].plot(index, [level[r["weight_format"]] + 0.1 for r in rows], "s", ms=3, label="weight")
        axes[1].plot(index, [level[r["act_format"]] - 0.1 for r in rows], "o", ms=3, label="activation")
        axes[1].set_yticks(range(len(names)), names)
        axes[1].set_ylabel("format")
    axes[2].plot(index, [r["weight_bias"] for r in rows], "s", ms=3, label="weight (median over rows)")
    axes[2].plot(index, [r["act_bias"] for r in rows], "o", ms=3, label="activation (per tensor)")
    axes[2].set_ylabel("tensor-range exponent bias" if blocks else "exponent bias")
    positions, labels, title = x_ticks(rows)
    axes[2].set_xticks(positions, labels, fontsize=7)
    axes[2].set_xticks(index, minor=True)
    axes[2].set_xlabel(title)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8, framealpha=0.7)
    fig.suptitle(Path(path).name, fontsize=9)
    fig.tight_layout()
    return fig


def plot_param_file(path: str | Path, out: str | Path) -> Path:
    """Write `layer_figure(path)` to `out` (PNG); returns out."""
    fig = layer_figure(path)
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("param_file")
    parser.add_argument("--out", default=None, help="PNG to write (default: next to the parameter file)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.param_file).with_suffix(".layers.png")
    try:
        written = plot_param_file(args.param_file, out)
    except ParamFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
