"""quality.md and its plots, from the figures `feathertune bench quality` kept for each row.

Forgetting is read here from what each row measured: a causal LM's loss on the general text minus the
base's (and that rise in % of the base's loss); an encoder's drift of its sentence embeddings from the
base's (1 − cosine, averaged; 0 is the base itself). The claims the papers make are checked one by one
against the table, each with the figures it rests on, holding or not.
"""

from __future__ import annotations

from pathlib import Path

SCORE_NAMES = {"accuracy": "dev accuracy (%)", "bleu": "validation BLEU"}
PAPERS = {
    "classification": "all-MiniLM-L6 + a new head on SST-2 (train: `data/sst2/train.tsv`, scored on all of `dev.tsv`)",
    "generation": "SmolLM2-135M-Instruct on E2E (train: `data/e2e/train.jsonl`; corpus BLEU against all references "
                  "of each of the validation file's meaning representations, sacrebleu)",
}


def render(results: dict, suites: list, quick: bool, header: str, out: Path) -> str:
    """The whole report as Markdown; writes the plots beside it (names end in -quick for --quick)."""
    suffix = "-quick" if quick else ""
    parts = [header, ""]
    if quick:
        parts += ["A reduced run (few steps, a few validation examples, 20 paragraphs of general text): it shows "
                  "that every method trains and beats its base, not how well. The full run's figures are in "
                  "quality.md.", ""]
    measured = {name: {row: got for row, got in rows.items() if "error" not in got} for name, rows in results.items()}
    for suite in suites:
        rows, everything = measured.get(suite.name), results.get(suite.name)
        if not everything:
            parts += [f"## {suite.name.capitalize()}: {PAPERS.get(suite.name, suite.model)}", "",
                      f"Not measured yet: `feathertune bench quality{' --quick' if quick else ''} --only {suite.name}` "
                      f"runs it.", ""]
            continue
        steps = suite.quick_steps if quick else suite.steps
        batch = suite.quick_batch_size if quick else suite.batch_size
        validation = f"the first {suite.quick_validation} validation examples" if quick else "the whole validation file"
        parts += [f"## {suite.name.capitalize()}: {PAPERS.get(suite.name, suite.model)}", "",
                  f"Every row: {steps} steps of batch {batch}, seed 0, its recipe's method settings and learning rate "
                  f"(`recipes/`); scored on {validation}.", "",
                  _table(suite, everything), ""]
        plot = out / f"quality{suffix}-{suite.name}.png"
        if _plot_suite(suite, rows, plot):
            parts += [f"![score against forgetting and trainable parameters]({plot.name})", ""]
        wise = [row for name, row in rows.items() if name.startswith("wise-")]
        if wise:
            parts += [f"### WiSE-FT: (1 − α)·θ_base + α·θ_tuned", "", _wise_table(suite, rows), ""]
            plot = out / f"quality{suffix}-{suite.name}-wise.png"
            if _plot_wise(suite, rows, plot):
                parts += [f"![WiSE-FT curves]({plot.name})", ""]
    parts += ["## The claims, checked", "", *_claims(measured), ""]
    parts += ["## How each column is measured", "",
              "- **score**: SST-2 dev accuracy in % / E2E validation corpus BLEU (sacrebleu 13a, all references).",
              "- **trainable**: parameters the optimizer updates (a new head included), and their share of the base "
              "model's parameters.",
              "- **adapter file**: the bytes of the saved adapter directory (safetensors + config); full fine-tuning "
              "and the top-2-blocks row save every tensor they train.",
              "- **train time**: wall time of the training steps alone (no loading, no evaluation); **peak memory**: "
              "the training process's peak resident set (Linux VmHWM, reset when training starts).",
              "- **forgetting**: generation — the rise of the loss on the general text (`data/general/wikitext.txt`, "
              "WikiText, CC BY-SA) over the base model's, in nats per token and in % of the base's; classification — "
              "MiniLM has no language-model head, so the drift of its mean-pooled sentence embeddings of the same "
              "text from the base's (1 − cosine, ×100).", ""]
    return "\n".join(parts)


def forgetting(suite_name: str, row: dict, base: dict | None) -> float | None:
    """Forgetting in the table's unit: % rise of the general loss (generation), 100 × drift (classification)."""
    if row.get("measure") == "drift":
        return 100 * row["drift"]
    if row.get("general_loss") is None or not base or base.get("general_loss") is None:
        return None if row.get("row") != "base" else 0.0
    return 100 * (row["general_loss"] / base["general_loss"] - 1)


def _table(suite, rows: dict) -> str:
    base = rows.get("base") if "error" not in rows.get("base", {"error": None}) else None
    unit = "loss rise (%)" if suite.name == "generation" else "embedding drift (×100)"
    lines = [f"| method | {SCORE_NAMES[suite.metric]} | trainable | share | adapter file | train time | peak memory "
             f"| forgetting: {unit} |", "|---|---|---|---|---|---|---|---|"]
    for row_spec in suite.rows:
        row = rows.get(row_spec.name)
        if row is None or "error" in row:
            what = "(not run)" if row is None else f"failed: {row['error']}".replace("|", "/")
            lines.append(f"| {row_spec.label} | {what} | | | | | | |")
            continue
        total = row.get("base_parameters") or (base or {}).get("base_parameters")
        trainable = row.get("trainable") or 0
        share = f"{100 * trainable / total:.3g} %" if total and row_spec.kind != "base" else ""
        forgot = forgetting(suite.name, row, base)
        forgot_text = "" if forgot is None else f"{forgot:+.2f}"
        if suite.name == "generation" and row.get("general_loss") is not None and base and row_spec.kind != "base":
            forgot_text += f" ({row['general_loss'] - base['general_loss']:+.3f} nats)"
        elif row_spec.kind == "base" and row.get("general_loss") is not None:
            forgot_text = f"0 (loss {row['general_loss']:.3f})"
        lines.append("| " + " | ".join([
            row_spec.label, f"{row['score']:.2f}", f"{trainable:,}" if row_spec.kind != "base" else "—", share,
            _size(row.get("adapter_bytes")), _seconds(row.get("train_seconds")), _mib(row.get("peak_memory_mib")),
            forgot_text]) + " |")
    return "\n".join(lines)


def _wise_points(suite, rows: dict, name: str) -> list[dict]:
    """α = 0 is the base row and α = 1 the fine-tuned row, as measured there; the sweep adds those between."""
    base, tuned, sweep = rows.get("base"), rows.get(name), rows.get(f"wise-{name}")
    if not (base and tuned and sweep):
        return []
    points = [{"alpha": 0.0, "score": base["score"], "forgetting": forgetting(suite.name, base, base) or 0.0}]
    for p in sweep["interpolation"]:
        points.append({"alpha": p["alpha"], "score": p["score"], "forgetting": forgetting(suite.name, p, base)})
    points.append({"alpha": 1.0, "score": tuned["score"], "forgetting": forgetting(suite.name, tuned, base)})
    return points


def _wise_table(suite, rows: dict) -> str:
    lines = ["| fine-tune | α | " + SCORE_NAMES[suite.metric] + " | forgetting |", "|---|---|---|---|"]
    for name in suite.wise:
        for p in _wise_points(suite, rows, name):
            forgot = "" if p["forgetting"] is None else f"{p['forgetting']:+.2f}"
            lines.append(f"| {name} | {p['alpha']:g} | {p['score']:.2f} | {forgot} |")
    return "\n".join(lines)


def _claims(results: dict) -> list[str]:
    """Each claim with the figures it rests on; ✅ holds at this scale, ❌ does not (shown, not hidden)."""
    lines = []

    def claim(text: str, holds: bool | None, figures: str) -> None:
        mark = "—" if holds is None else ("✅" if holds else "❌")
        lines.append(f"- {mark} {text}: {figures}")

    c, g = results.get("classification", {}), results.get("generation", {})
    score = lambda rows, name: rows[name]["score"] if name in rows else None  # noqa: E731
    if c:
        full, lora, qlora, reft, peft_lora = (score(c, n) for n in ("full", "lora", "qlora", "loreft", "peft-lora"))
        if full is not None:
            claim("SST-2: full fine-tuning ≥ 88 %", full >= 88, f"{full:.2f} %")
        if full is not None and lora is not None:
            share = c["lora"]["trainable"] / c["full"]["trainable"]
            claim("SST-2: LoRA within 2 points of full fine-tuning with ≤ 2 % of its trainable parameters (Hu et al. 2022)",
                  full - lora <= 2 and share <= 0.02, f"LoRA {lora:.2f} vs full {full:.2f} ({lora - full:+.2f}); "
                  f"{100 * share:.2f} % of full's trainable parameters")
        if qlora is not None and lora is not None:
            claim("SST-2: QLoRA within 1 point of LoRA (Dettmers et al. 2023)", abs(qlora - lora) <= 1,
                  f"QLoRA {qlora:.2f} vs LoRA {lora:.2f} ({qlora - lora:+.2f})")
        if reft is not None and lora is not None:
            fewer = c["lora"]["trainable"] / c["loreft"]["trainable"]
            claim("SST-2: LoReFT within 3 points of LoRA with ≥ 10× fewer trainable parameters (Wu et al. 2024)",
                  lora - reft <= 3 and fewer >= 10, f"LoReFT {reft:.2f} vs LoRA {lora:.2f} ({reft - lora:+.2f}); "
                  f"{fewer:.1f}× fewer parameters")
        if peft_lora is not None and lora is not None:
            claim("SST-2: feathertune's LoRA within 1 point of PEFT's on the same budget", abs(lora - peft_lora) <= 1,
                  f"{lora:.2f} vs PEFT {peft_lora:.2f} ({lora - peft_lora:+.2f})")
        if "dora" in c and lora is not None:
            claim("SST-2: DoRA above LoRA at the same rank (Liu et al. 2024)", c["dora"]["score"] > lora,
                  f"DoRA {c['dora']['score']:.2f} vs LoRA {lora:.2f}")
        for name in ("houlsby", "pfeiffer"):
            if name in c and full is not None:
                claim(f"SST-2: {name.capitalize()} adapters within 1 point of full fine-tuning with a few % of its "
                      f"parameters (Houlsby et al. 2019)", full - c[name]["score"] <= 1,
                      f"{c[name]['score']:.2f} vs {full:.2f}, {100 * c[name]['trainable'] / c['full']['trainable']:.2f} %")
        if "lp-ft" in c and "full" in c:
            lp, fu = c["lp-ft"], c["full"]
            claim("SST-2: LP-FT distorts the features less than fine-tuning (Kumar et al. 2022)",
                  lp["drift"] < fu["drift"], f"embedding drift ×100 {100 * lp['drift']:.2f} (LP-FT) vs "
                  f"{100 * fu['drift']:.2f} (full); accuracy {lp['score']:.2f} vs {fu['score']:.2f}")
    if g:
        base, lora, full, peft_lora = (score(g, n) for n in ("base", "lora", "full", "peft-lora"))
        if lora is not None:
            claim("E2E: LoRA BLEU ≥ 60", lora >= 60, f"{lora:.2f}")
        trained = {n: r["score"] for n, r in g.items() if n != "base" and "score" in r}
        if base is not None and trained:
            below = {n: v for n, v in trained.items() if v <= base}
            lowest = min(trained, key=trained.get)
            claim("E2E: every method above the base", not below,
                  f"base {base:.2f}; " + (f"lowest {lowest} {trained[lowest]:.2f}" if not below else
                                          "not above: " + ", ".join(f"{n} {v:.2f}" for n, v in below.items())))
        if peft_lora is not None and lora is not None:
            claim("E2E: feathertune's LoRA within 1 BLEU of PEFT's on the same budget", abs(lora - peft_lora) <= 1,
                  f"{lora:.2f} vs PEFT {peft_lora:.2f} ({lora - peft_lora:+.2f})")
        if lora is not None and full is not None:
            fl, ff = forgetting("generation", g["lora"], g.get("base")), forgetting("generation", g["full"], g.get("base"))
            if fl is not None and ff is not None:
                claim("E2E: LoRA forgets less than full fine-tuning (Biderman et al. 2024), as trained", fl < ff,
                      f"general-text loss rise {fl:+.2f} % (LoRA, BLEU {lora:.2f}) vs {ff:+.2f} % (full, BLEU {full:.2f})")
                matched = _at_comparable_score(g, "lora", full)
                if matched is not None and matched["forgetting"] is not None:
                    claim("E2E: … and at comparable BLEU (the LoRA WiSE-FT point nearest full fine-tuning's BLEU)",
                          matched["forgetting"] < ff, f"LoRA at α = {matched['alpha']:g}: BLEU {matched['score']:.2f}, "
                          f"loss rise {matched['forgetting']:+.2f} % vs full: BLEU {full:.2f}, {ff:+.2f} %")
        if "dora" in g and lora is not None:
            claim("E2E: DoRA above LoRA at the same rank (Liu et al. 2024)", g["dora"]["score"] > lora,
                  f"DoRA {g['dora']['score']:.2f} vs LoRA {lora:.2f}")
    for suite_name, rows in (("classification", c), ("generation", g)):
        for name in ("full", "lora"):
            from feathertune.quality import SUITES

            points = _wise_points(SUITES[suite_name], rows, name) if rows else []
            if len(points) >= 3:
                mid = next(p for p in points if p["alpha"] == 0.5)
                end = points[-1]
                gain = (mid["score"] - points[0]["score"]) / max(end["score"] - points[0]["score"], 1e-9)
                forgot = "" if mid["forgetting"] is None or end["forgetting"] is None else \
                    f"; forgetting {mid['forgetting']:+.2f} vs {end['forgetting']:+.2f} at α = 1"
                claim(f"{suite_name}: WiSE-FT at α = 0.5 keeps most of {name}'s gain and forgets less (Wortsman et al. 2022)",
                      gain >= 0.5 and (mid["forgetting"] is None or end["forgetting"] is None
                                       or mid["forgetting"] <= end["forgetting"]),
                      f"score {mid['score']:.2f} = {100 * gain:.0f} % of the gain{forgot}")
    return lines or ["(no rows measured yet)"]


def _at_comparable_score(rows: dict, name: str, score: float) -> dict | None:
    """The point of `name`'s WiSE-FT curve (α = 1 included) whose score is nearest `score`."""
    from feathertune.quality import GENERATION

    points = _wise_points(GENERATION, rows, name)[1:]  # α = 0 is the base itself
    return min(points, key=lambda p: abs(p["score"] - score)) if points else None


def _plot_suite(suite, rows: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows.get("base")
    points = [(spec.label, rows[spec.name]) for spec in suite.rows if spec.name in rows and spec.kind != "base"]
    if not points:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for label, row in points:
        forgot = forgetting(suite.name, row, base)
        if forgot is not None:
            axes[0].scatter(forgot, row["score"])
            axes[0].annotate(label, (forgot, row["score"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        if row.get("trainable"):
            axes[1].scatter(row["trainable"], row["score"])
            axes[1].annotate(label, (row["trainable"], row["score"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    if base:
        for ax in axes:
            ax.axhline(base["score"], color="grey", linestyle=":", label=f"base {base['score']:.1f}")
            ax.legend(loc="lower right")
    axes[0].set_xlabel("forgetting: general-text loss rise (%)" if suite.name == "generation"
                       else "forgetting: sentence-embedding drift (×100)")
    axes[1].set_xlabel("trainable parameters")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel(SCORE_NAMES[suite.metric])
        ax.grid(alpha=0.3)
    fig.suptitle(f"{suite.name}: {suite.model}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_wise(suite, rows: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: _wise_points(suite, rows, name) for name in suite.wise}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for name, points in curves.items():
        alphas = [p["alpha"] for p in points]
        axes[0].plot(alphas, [p["score"] for p in points], "o-", label=name)
        drawn = [p for p in points if p["forgetting"] is not None]
        axes[1].plot([p["forgetting"] for p in drawn], [p["score"] for p in drawn], "o-", label=name)
        for p in drawn:
            axes[1].annotate(f"α={p['alpha']:g}", (p["forgetting"], p["score"]), fontsize=8, xytext=(3, -10),
                             textcoords="offset points")
    axes[0].set_xlabel("α (0: the base, 1: the fine-tune)")
    axes[1].set_xlabel("forgetting: general-text loss rise (%)" if suite.name == "generation"
                       else "forgetting: sentence-embedding drift (×100)")
    for ax in axes:
        ax.set_ylabel(SCORE_NAMES[suite.metric])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"WiSE-FT on {suite.name}: (1 − α)·base + α·fine-tune")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _size(count: int | None) -> str:
    if count is None:
        return ""
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.0f} KiB"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f} s"


def _mib(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f} MiB"
