"""The bench results as markdown, written between two markers in runner/CONTRIBUTING.md."""

from __future__ import annotations

from pathlib import Path

START, END = "<!-- bench:start (written by python -m bench) -->", "<!-- bench:end -->"
VARIANTS = {"plain_loop": "plain loop", "plain_loop_foreach": "plain loop, foreach SGD", "plain_lightning": "plain Lightning",
            "nnopt": "nnopt train stage"}


def tables(results: dict) -> str:
    c = results["conditions"]
    lines = [f"`{c['command']}` on {c['date'][:10]}: torch {c['torch']}, Lightning {c['pytorch_lightning']}, "
             f"{c['cpu_count']} cores shared with other jobs (load {c['load_average_at_start'][0]} at start), "
             f"torch pinned to {c['torch_threads']} thread(s), medians of {c['repeats']} interleaved repeats.", ""]
    if "train" in results:
        lines += ["| training (batch 128, SGD Nesterov + cosine) | " + " | ".join(VARIANTS.values()) + " |",
                  "|---" * (len(VARIANTS) + 1) + "|"]
        for model, entry in results["train"].items():
            wall, cpu = entry["wall"], entry["cpu"]
            cells = [f"{wall['samples_per_second'][k]:,.0f}/s ({wall['speed_vs_plain_loop'][k]:.3f}x; "
                     f"CPU time {cpu['speed_vs_plain_loop'][k]:.3f}x)" for k in VARIANTS]
            lines.append(f"| {model}, {entry['steps']} steps | " + " | ".join(cells) + " |")
        lines += ["", "Samples per wall-clock second; in brackets the speed relative to the plain loop (median of "
                  "per-repeat ratios) by wall time and by process CPU time (which the other jobs on the shared cores "
                  "do not inflate).", ""]
    if results.get("recipes") or results.get("recipes_missing"):
        lines += ["| recipe end to end | wall time |", "|---|---|"]
        for name, entry in results.get("recipes", {}).items():
            lines.append(f"| `{name}` | {entry['median_seconds']:.1f} s (median of {len(entry['seconds'])}) |")
        for name in results.get("recipes_missing", []):
            lines.append(f"| `{Path(name).name}` | not in this checkout yet |")
        lines.append("")
    if "inference" in results:
        sizes = sorted({int(k.rsplit("_b", 1)[1]) for entry in results["inference"].values() for k in entry
                        if k.startswith("eager_ms_b")})
        head = " | ".join(f"batch {b} eager | batch {b} fastest path" for b in sizes)
        lines += [f"| artifact latency | {head} |", "|---" * (2 * len(sizes) + 1) + "|"]
        for name, entry in results["inference"].items():
            cells = []
            for b in sizes:
                cells.append(f"{entry[f'eager_ms_b{b}']:.3f} ms ({entry[f'eager_speedup_b{b}']:.2f}x)")
                cells.append(f"{entry[f'fastest_ms_b{b}']:.3f} ms ({entry[f'fastest_speedup_b{b}']:.2f}x, "
                             f"{entry[f'path_b{b}']})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "Median ms per forward pass; in brackets the speed-up over the run's first (dense fp32) artifact "
                  "run the same way (eager vs eager, fastest vs fastest), median of per-repeat ratios, and the path "
                  "runner.deploy picked (the one evaluate reports as deploy_path_b<N>).", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_readme(readme: Path, results: dict) -> None:
    text = readme.read_text(encoding="utf-8")
    block = f"{START}\n{tables(results)}{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Performance\n\n" + block + "\n"
    readme.write_text(text, encoding="utf-8")
