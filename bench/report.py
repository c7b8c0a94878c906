"""The bench results as markdown, written between two markers in runner/CONTRIBUTING.md."""

from __future__ import annotations

from pathlib import Path

START, END = "<!-- bench:start (written by python -m bench) -->", "<!-- bench:end -->"
VARIANTS = {"plain_loop": "plain loop", "plain_loop_foreach": "plain loop, foreach SGD", "plain_lightning": "plain Lightning",
            "bare_lightning": "bare Lightning, foreach SGD", "nnopt": "nnopt train stage"}


def tables(results: dict) -> str:
    c = results["conditions"]
    lines = [f"`{c['command']}` on {c['date'][:10]}: torch {c['torch']}, Lightning {c['pytorch_lightning']}, "
             f"{c['cpu_count']} cores shared with other jobs (load {c['load_average_at_start'][0]} at start), "
             f"torch pinned to {c['torch_threads']} thread(s), medians of {c['repeats']} interleaved repeats.", ""]
    if "startup" in results:
        lines += ["| command (fresh process) | wall | CPU |", "|---|---|---|"]
        for name, entry in results["startup"].items():
            lines.append(f"| `{name}` | {entry['median_wall_seconds']:.2f} s | {entry['median_cpu_seconds']:.2f} s |")
        lines += ["", "Medians; CPU is the child process's user+system time, which the other jobs on the shared cores "
                  "inflate less than wall time.", ""]
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
    if "streaming" in results:
        entry = results["streaming"]
        wall, cpu = entry["wall"], entry["cpu"]
        lines += [f"| resnet18, {entry['image_size']}px, batch {entry['batch_size']}, {entry['steps']} steps, "
                  f"{entry['train_images']} training images | samples/s | speed vs pre-decoded (wall) | "
                  "training process CPU time |", "|---|---|---|---|"]
        for name, label in (("image_folder", f"image folder, {entry['workers']} worker(s) decode + augment"),
                            ("pre_decoded", "the same images pre-decoded in memory")):
            lines.append(f"| {label} | {wall['samples_per_second'][name]:,.1f} | "
                         f"{wall['speed_vs_pre_decoded'][name]:.3f}x | {cpu['speed_vs_pre_decoded'][name]:.3f}x |")
        lines += ["", "Train stage wall time (workers started, batches decoded and augmented in them); the CPU column "
                  "counts only the training process, so it shows what the workers took off it.", ""]
    if "scale" in results:
        lines += ["| streaming, one epoch (resnet18) | training images | epoch | samples/s | trainer RSS before | "
                  "trainer peak RSS in the epoch | a worker's peak RSS |", "|---|---|---|---|---|---|---|"]
        for factor, entry in results["scale"].items():
            lines.append(f"| {factor} | {entry['train_images']} | {entry['epoch_seconds']:.2f} s | "
                         f"{entry['samples_per_second']:,.1f} | {entry['rss_before_mb']:,.0f} MB | "
                         f"{entry['peak_rss_mb']:,.0f} MB | {entry['worker_peak_rss_mb']:,.0f} MB |")
        lines += ["", "Each size in a fresh process (one run each); the epoch includes its validation pass; the "
                  "trainer's peak is reset after imports, so it covers building the data and model and the epoch."
                  + (f" Measured apart: `{results['scale_conditions']['command']}` on "
                     f"{results['scale_conditions']['date'][:16]} (load {results['scale_conditions']['load_average_at_start'][0]})."
                     if "scale_conditions" in results else ""), ""]
    if "bf16" in results:
        lines += ["| CPU precision | fp32 | bf16-mixed | bf16 speed vs fp32 (wall; CPU) | test accuracy fp32 / bf16 |",
                  "|---|---|---|---|---|"]
        for model, entry in results["bf16"].items():
            wall, cpu, acc = entry["wall"], entry["cpu"], entry["test_accuracy"]
            lines.append(f"| {model}, {entry['steps']} steps, batch {entry['batch_size']} | "
                         f"{wall['samples_per_second']['32-true']:,.0f}/s | {wall['samples_per_second']['bf16-mixed']:,.0f}/s | "
                         f"{wall['speed_vs_32-true']['bf16-mixed']:.3f}x; {cpu['speed_vs_32-true']['bf16-mixed']:.3f}x | "
                         f"{acc['32-true']:.4f} / {acc['bf16-mixed']:.4f} |")
        lines += ["", "`trainer.precision: bf16-mixed` (torch.autocast on CPU) against `32-true`, same seed and steps; "
                  "accuracy of the trained weights in fp32 on the test split.", ""]
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
