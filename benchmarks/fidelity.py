"""Fidelity of the search proxy: does its 1-seed ranking of layers predict a held-out ranking?

The reference ranking is a genuinely different task trained longer: Fashion-MNIST's 60,000
training images (validation: a fixed stratified hold-out of 3,000 of them), 3x the default
proxy's steps (900), 3 seeds, scored by the mean accuracy over seeds and architectures. Its
images are resized to 8x8 (the resolution the 2-core box affords; `REFERENCE_CONFIG`). No
image of it is in `fashion_small`, which is drawn from Fashion-MNIST's test set.

Each candidate proxy setting (`SETTINGS`: steps, image size, width, batch size, dataset) scores
every layer once (seed 0), as a search scores a candidate; its agreement with the reference is
Spearman's rho and Kendall's tau over the layers (scipy.stats), with a 95% percentile bootstrap
interval for rho (resampling layers), next to its cost in CPU seconds per evaluation (one torch
thread, `time.process_time` of the evaluating process, summed over the architectures).
"top half" repeats rho over the layers in the upper half of the reference ranking: a ranking
of good layers among themselves, which the gap between normalised and unnormalised layers does
not carry.

Architectures train independently (each from its own seed), so the run goes architecture by
architecture (resnet for every layer, then mobilenetv2, then efficientnet, then the further
settings) and reports over the first one, the first two, and all three as results allow.

Layers: known layers plus the graphs under benchmarks/found_layers/ (candidates that real
searches evaluated; each file records its search, command, trial and search scores).

    # 1. store layers found by searches (graph JSON of our schema + where each came from)
    python benchmarks/fidelity.py collect --storage sqlite:///runs/f1/study.db --study f1 [--trials f1=3,7]
    # 2. one evaluation (bn_relu) per setting: its cost, to size the run
    python benchmarks/fidelity.py plan --results benchmarks/fidelity_results.jsonl
    # 3. the run: results are cached by (layer, setting, seed, config) in a JSON-lines file, so a
    #    re-run skips what is done and a partial run still reports
    python benchmarks/fidelity.py run --results benchmarks/fidelity_results.jsonl --workers 2
    # 4. the tables (also printed at the end of `run`)
    python benchmarks/fidelity.py report --results benchmarks/fidelity_results.jsonl [--json]

Round 2 (issue 18): among the good layers only (`GOOD_LAYERS`: at or above EvoNorm-S0 by search
score), which proxy separates them and ranks them as a harder, independent run does?

- reference (`REFERENCE2_CONFIG`): Fashion-MNIST's training images at 14x14, width 16, groups of
  4 channels, 900 steps, 3 architectures, its own seeds (`REFERENCE2_SEEDS`, 1000-1002);
- proxies (`PROXIES`), each with seeds 0, 1, 2 (seed 0 is the search's);
- per proxy: CPU seconds per evaluation (median over its runs, summed over the architectures);
  separability: ICC(1) of a one-way ANOVA over (layer, seed) scores (`icc_oneway`: the share of
  a score's variance that lies between layers, with its F-based 95% interval); fidelity:
  Spearman of the proxy's ranking (seed 0; one seed, averaged over seeds; the seed mean) against
  the reference's seed-mean ranking, 95% percentile bootstrap over layers, and its paired
  difference from the default proxy (digits) on the same resamples (`bootstrap_rho`).
  A score is the mean over the architectures within one seed: the seed is the replicate, the
  architecture a blocking factor whose effect is common to every layer.

    python benchmarks/fidelity.py good-run --results benchmarks/fidelity_good.jsonl   # 1 worker, resumable
    python benchmarks/fidelity.py good-report --results benchmarks/fidelity_good.jsonl [--json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent
FOUND_DIR = HERE / "found_layers"

KNOWN_LAYERS = ("bn_relu", "gn_relu", "ln_relu", "evonorm_b0", "evonorm_s0", "relu_only", "identity")

# Candidate proxies: EvalConfig overrides on top of the default (digits 8x8, width 8, 300 steps,
# batch 32). Each is scored with one seed, as a search scores a candidate. Listed in the order a
# run covers them (the first one for every layer together with the reference, then the others).
SETTINGS: dict[str, dict] = {
    "digits": {},  # the default search proxy
    "fashion_small8": {"dataset": "fashion_small", "dataset_options": {"image_size": 8}},
    "fashion_small14": {"dataset": "fashion_small"},
    "digits_900": {"steps": 900},
    "digits_w16": {"arch_options": {"width": 16}},
    "digits_b64": {"batch_size": 64},
    "fashion_small14_600": {"dataset": "fashion_small", "steps": 600},
}
REFERENCE = "reference"
REFERENCE_SEEDS = (0, 1, 2)
REFERENCE_CONFIG = {"dataset": "fashion_mnist",
                    "dataset_options": {"image_size": 8, "val_size": 3000},
                    "steps": 900}
ARCHS = ("resnet", "mobilenetv2", "efficientnet")

# -- round 2 (issue 18): separability and fidelity among the good layers ----------------------
# The good layers: those that search scores put at or above EvoNorm-S0 (chosen before any
# round-2 result: the known normalised layers but ln_relu, the found f1 layers but f1_t10, and
# seven top candidates of the discovery runs, one per kind of statistic where possible).
GOOD_LAYERS = ("bn_relu", "gn_relu", "evonorm_b0", "evonorm_s0",
               "found/f1_t12", "found/f1_t17", "found/f1_t22", "found/f1_t31", "found/f1_t33",
               "found/f1_t34", "found/regularized_evolution-s1_t1041", "found/random-s4_t9509",
               "found/nsga2-s3_t3956", "found/nsga2-s0_t3046", "found/pareto_evolution-s3_t207",
               "found/regularized_evolution-s4_t241", "found/random-s1_t1607")
# The reference: a different and harder run than any proxy. Fashion-MNIST's 60,000 training
# images (none in fashion_small, which comes from the test set; validation: a fixed stratified
# hold-out of 3,000), 14x14 (28x28 measured at ~165 CPU-s per 3-architecture evaluation: 17
# layers x 2 seeds would be 94 CPU-minutes alone), width 16 (twice the proxies' default), 900
# steps (3x), groups of 4 channels (16 / 4 at the narrowest layer), and its own seeds.
# A proxy that differs from another only in `groups` trains a layer without group statistics
# exactly as that one does (same seed, same computation: checked on bn_relu, evonorm_b0, f1_t12),
# so such layers run once and are read from the base proxy (`uses_groups`).
GROUPS_BASE = {"digits_g2": "digits", "fashion_small8_g2": "fashion_small8"}
REFERENCE2 = "reference_f14_w16"
REFERENCE2_CONFIG = {"dataset": "fashion_mnist",
                     "dataset_options": {"image_size": 14, "val_size": 3000},
                     "arch_options": {"width": 16}, "layer_options": {"groups": 4},
                     "steps": 900}
REFERENCE2_SEEDS = (1000, 1001, 1002)  # disjoint from the proxies' seeds
PROXY_SEEDS = (0, 1, 2)  # seed 0 is the search's
# Candidate proxies (EvalConfig overrides on the default: digits 8x8, width 8, 300 steps,
# groups 32, which at width 8 are groups of 1 channel). g2 / g4: groups that hold >= 4 channels
# at width 8 / 16. In the order a run covers them.
PROXIES: dict[str, dict] = {
    "digits": {},
    "digits_g2": {"layer_options": {"groups": 2}},
    "fashion_small8": {"dataset": "fashion_small", "dataset_options": {"image_size": 8}},
    "fashion_small8_g2": {"dataset": "fashion_small", "dataset_options": {"image_size": 8},
                          "layer_options": {"groups": 2}},
    "fashion_small14_g2": {"dataset": "fashion_small", "layer_options": {"groups": 2}},
    "fashion_small8_w16_g4": {"dataset": "fashion_small", "dataset_options": {"image_size": 8},
                              "arch_options": {"width": 16}, "layer_options": {"groups": 4}},
}


def config_of(setting: str, custom: dict | None = None, arch: str | None = None) -> dict:
    """The setting's EvalConfig overrides; with `arch`, for that architecture alone (each
    architecture trains independently, from its own seed, so a layer's score is the mean of its
    per-architecture runs and a run can cover the architectures one after another)."""
    table = {**SETTINGS, REFERENCE: REFERENCE_CONFIG, **(custom or {})}
    table = {**table, **{f"r2/{k}": v for k, v in PROXIES.items()}, REFERENCE2: REFERENCE2_CONFIG}
    config = {"accelerator": "cpu", "threads": 1, **table[setting]}
    if arch is not None:
        config["archs"] = [arch]
    return config


def config_hash(config: dict) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


# -- layers ----------------------------------------------------------------------------------

def layer_table(known: list[str], found_dir: Path) -> dict[str, str]:
    """label -> what the evaluator takes (a known name or a graph file's path)."""
    table = {name: name for name in known}
    for path in sorted(found_dir.glob("*.json")):
        table[f"found/{path.stem}"] = str(path)
    return table


def interleave(labels: list[str]) -> list[str]:
    """Known and found layers alternated, so that a partial run covers both kinds."""
    known = [x for x in labels if not x.startswith("found/")]
    found = [x for x in labels if x.startswith("found/")]
    out = []
    for i in range(max(len(known), len(found))):
        out += known[i:i + 1] + found[i:i + 1]
    return out


def collect(args) -> None:
    """Store evaluated candidates of finished searches as graph JSON files, with a spread of scores."""
    import optuna

    from opsearch import graph as graph_lib

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    picked: list[dict] = []
    seen: set[str] = {json.loads(p.read_text())["formula"] for p in out.glob("*.json")}
    for storage, name in zip(args.storage, args.study):
        study = optuna.load_study(study_name=name, storage=storage)
        search_config = study.user_attrs.get("config")
        if isinstance(search_config, str):
            search_config = json.loads(search_config)
        rows = []
        for t in study.get_trials(deepcopy=False):
            a = t.user_attrs
            if a.get("kind", "candidate") != "candidate" or a.get("verdict") != "evaluated":
                continue
            if a.get("formula") in seen or "graph" not in a:
                continue
            accs = {k[4:]: v for k, v in a.items() if k.startswith("acc/")}
            if not accs:
                continue
            seen.add(a["formula"])
            rows.append({"trial": t.number, "formula": a["formula"], "graph": a["graph"],
                         "accuracies": accs, "mean": sum(accs.values()) / len(accs)})
        rows.sort(key=lambda r: -r["mean"])
        if name in args.trials:  # chosen by hand (e.g. to skip a re-spelling of a known layer)
            idx = [i for i, r in enumerate(rows) if r["trial"] in args.trials[name]]
        else:  # an even spread over the sorted scores: best, worst and evenly between
            k = min(args.count, len(rows))
            idx = sorted({round(i * (len(rows) - 1) / max(1, k - 1)) for i in range(k)}) if k else []
        for i in idx:
            r = rows[i]
            graph = r["graph"] if isinstance(r["graph"], dict) else json.loads(r["graph"])
            graph_lib.plain_from_dict(graph)  # refuse anything that is not a graph of our schema
            record = {"graph": graph, "formula": r["formula"],
                      "source": {"study": name, "storage": storage, "trial": r["trial"],
                                 "search_config": search_config,
                                 "command": args.commands.get(name),
                                 "search_accuracies": r["accuracies"], "search_mean": r["mean"]}}
            path = out / f"{name}_t{r['trial']}.json"
            path.write_text(json.dumps(record, indent=1) + "\n")
            picked.append(record)
            print(f"{path.name}: {r['mean']:.3f}  {r['formula']}")
    print(f"{len(picked)} layers written to {out}")


# -- evaluation ------------------------------------------------------------------------------

_evaluators: dict = {}


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def evaluate_one(layer_label: str, layer: str, setting: str, seed: int, config: dict) -> dict:
    from opsearch.trainers.evaluator import EvalConfig, Evaluator

    key = (config_hash(config), seed)
    if key not in _evaluators:
        _evaluators[key] = Evaluator(EvalConfig.from_dict({**config, "seed": seed}))
    evaluator = _evaluators[key]
    cpu, wall = time.process_time(), time.perf_counter()
    result = evaluator.evaluate(layer)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"layer": layer_label, "setting": setting, "seed": seed, "config": config_hash(config),
            "archs": list(result.accuracies), "accuracies": result.accuracies, "mean": result.mean_accuracy,
            "diverged": result.diverged, "cpu_s": cpu, "wall_s": wall}


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: that job runs again
                pass
    return rows


def jobs_for(layers: dict[str, str], settings: list[str], custom: dict, first: int,
             archs: list[str]) -> list[tuple]:
    """Architecture by architecture: every layer's reference (3 seeds) and `first` settings on
    archs[0], then on archs[1], ...; then the further settings. A run cut short still compares
    the main settings over every layer, on the architectures it reached."""
    order = interleave(list(layers))
    jobs = []
    for arch in archs:
        for label in order:
            for seed in REFERENCE_SEEDS:
                jobs.append((label, layers[label], REFERENCE, seed, config_of(REFERENCE, custom, arch)))
            jobs += [(label, layers[label], s, 0, config_of(s, custom, arch)) for s in settings[:first]]
    for s in settings[first:]:
        for arch in archs:
            jobs += [(label, layers[label], s, 0, config_of(s, custom, arch)) for label in order]
    return jobs


def uses_groups(layer: str) -> bool:
    """Whether a layer (a known name or a graph file) computes group statistics (mean_g, ...)."""
    import re

    from opsearch import graph as graph_lib, layers as layers_lib

    return re.search(r"_g\(", graph_lib.formula(layers_lib.resolve(layer))) is not None


def good_jobs(layers: dict[str, str], proxies: list[str], archs: list[str], first: int | None = None) -> list[tuple]:
    """Round 2, in the order that lets a cut run report: the reference's first seed for every
    layer, every proxy's seed 0 for every layer; then layer by layer the reference's second seed
    and seed 1 of the first `first` proxies (a layer is then complete for the reference's noise
    and the proxies' separability); then seed 1 of the other proxies, seed 2 of all, and the
    reference's third seed. Each job is one architecture (they train independently)."""
    first = len(proxies) if first is None else first

    def ref(seed, labels=layers):
        return [(label, layers[label], REFERENCE2, seed, config_of(REFERENCE2, None, a))
                for label in labels for a in archs]

    grouped = {label for label in layers if uses_groups(layers[label])}

    def prox(seed, names, labels=layers):
        return [(label, layers[label], f"r2/{p}", seed, config_of(f"r2/{p}", None, a))
                for label in labels for p in names for a in archs
                if not (p in GROUPS_BASE and GROUPS_BASE[p] in proxies and label not in grouped)]

    jobs = ref(REFERENCE2_SEEDS[0]) + prox(PROXY_SEEDS[0], proxies)
    for label in layers:
        jobs += ref(REFERENCE2_SEEDS[1], [label]) + prox(PROXY_SEEDS[1], proxies[:first], [label])
    jobs += prox(PROXY_SEEDS[1], proxies[first:])
    for seed in PROXY_SEEDS[2:]:
        jobs += prox(seed, proxies)
    for seed in REFERENCE2_SEEDS[2:]:
        jobs += ref(seed)
    return jobs


def run_jobs(jobs: list[tuple], results_path: Path, workers: int) -> None:
    done = {(r["layer"], r["setting"], r["seed"], r["config"]) for r in read_results(results_path)}
    todo = [j for j in jobs if (j[0], j[2], j[3], config_hash(j[4])) not in done]
    print(f"# {len(jobs)} evaluations, {len(jobs) - len(todo)} cached, {len(todo)} to run "
          f"on {workers} worker(s) x 1 thread", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool, \
            open(results_path, "a") as out:
        futures = {pool.submit(evaluate_one, *j): j for j in todo}
        for n, future in enumerate(as_completed(futures), 1):
            try:
                r = future.result()
            except Exception as e:  # one broken layer must not lose the others' results
                j = futures[future]
                print(f"FAILED {j[0]} {j[2]} seed {j[3]}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            out.write(json.dumps(r) + "\n")
            out.flush()
            print(f"[{n}/{len(todo)} {time.perf_counter() - start:.0f}s] {r['setting']:>20} seed {r['seed']} "
                  f"{r['mean']:.3f} cpu {r['cpu_s']:.1f}s  {r['layer']}", file=sys.stderr, flush=True)


# -- statistics ------------------------------------------------------------------------------

def agreement(x: list[float], y: list[float]) -> dict:
    """Spearman rho (95% percentile bootstrap over layers), Kendall tau (scipy.stats)."""
    import numpy as np
    from scipy import stats

    out = {"n": len(x), "spearman": math.nan, "spearman_p": math.nan, "spearman_ci": [math.nan, math.nan],
           "kendall": math.nan, "kendall_p": math.nan}
    if len(x) < 3:
        return out
    rho = stats.spearmanr(x, y)
    tau = stats.kendalltau(x, y)
    out.update(spearman=float(rho.statistic), spearman_p=float(rho.pvalue),
               kendall=float(tau.statistic), kendall_p=float(tau.pvalue))
    if len(x) >= 5:
        def rho_of(a, b):
            return stats.spearmanr(a, b).statistic

        with np.errstate(invalid="ignore", divide="ignore"):
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ci = stats.bootstrap((np.asarray(x), np.asarray(y)), rho_of, paired=True, vectorized=False,
                                     n_resamples=2000, method="percentile",
                                     random_state=np.random.default_rng(0)).confidence_interval
        out["spearman_ci"] = [float(ci.low), float(ci.high)]
    return out


def scores_by_key(rows: list[dict], archs: list[str], custom: dict | None = None) -> dict[tuple, dict]:
    """(layer, setting, seed) -> {"mean": accuracy averaged over `archs`, "cpu_s": their summed
    CPU seconds}, for the runs that cover every one of `archs` with the setting's current config."""
    valid: dict[str, set] = {}
    for setting in {r["setting"] for r in rows}:
        if (setting in SETTINGS or setting in (REFERENCE, REFERENCE2) or setting in (custom or {})
                or setting.removeprefix("r2/") in PROXIES and setting.startswith("r2/")):
            valid[setting] = {config_hash(config_of(setting, custom))} | {
                config_hash(config_of(setting, custom, a)) for a in ARCHS}
    parts: dict[tuple, dict] = {}
    for r in rows:
        if r["config"] not in valid.get(r["setting"], ()):
            continue  # made with an older definition of the setting
        entry = parts.setdefault((r["layer"], r["setting"], r["seed"]), {})
        for arch, acc in r["accuracies"].items():
            entry[arch] = (acc, r["cpu_s"] / len(r["accuracies"]))
    out = {}
    for key, entry in parts.items():
        if all(a in entry for a in archs):
            out[key] = {"mean": sum(entry[a][0] for a in archs) / len(archs),
                        "cpu_s": sum(entry[a][1] for a in archs)}
    return out


def summarize(rows: list[dict], layers: list[str] | None = None, archs: list[str] = ARCHS,
              custom: dict | None = None) -> dict:
    """Per setting: cost, and agreement of its seed-0 score with the reference's 3-seed mean,
    both over the architectures `archs`."""
    import statistics

    by = scores_by_key(rows, list(archs), custom)
    rows = [{"layer": k[0], "setting": k[1], "seed": k[2]} for k in by]
    ref = {}
    for label in {r["layer"] for r in rows}:
        seeds = [by[(label, REFERENCE, s)]["mean"] for s in REFERENCE_SEEDS if (label, REFERENCE, s) in by]
        if len(seeds) == len(REFERENCE_SEEDS):
            ref[label] = statistics.fmean(seeds)
    if layers is not None:
        ref = {k: v for k, v in ref.items() if k in layers}
    settings = sorted({r["setting"] for r in rows if r["setting"] != REFERENCE},
                      key=lambda s: list(SETTINGS).index(s) if s in SETTINGS else len(SETTINGS))
    median = statistics.median(ref.values()) if ref else math.nan
    top = {k for k, v in ref.items() if v >= median}
    table = {}
    for s in settings:
        labels = sorted(k for k in ref if (k, s, 0) in by)
        x = [by[(k, s, 0)]["mean"] for k in labels]
        y = [ref[k] for k in labels]
        cost = statistics.fmean(by[(k, s, 0)]["cpu_s"] for k in labels) if labels else math.nan
        entry = {"layers": len(labels), "cpu_s_per_eval": cost, **agreement(x, y),
                 "top_half": agreement([by[(k, s, 0)]["mean"] for k in labels if k in top],
                                       [ref[k] for k in labels if k in top])}
        entry["spearman_per_cpu_s"] = entry["spearman"] / cost if cost else math.nan
        table[s] = entry
    # the reference's own noise: one reference seed against the mean of the other two
    labels = sorted(ref)
    if labels:
        one = [by[(k, REFERENCE, 0)]["mean"] for k in labels]
        rest = [statistics.fmean(by[(k, REFERENCE, s)]["mean"] for s in REFERENCE_SEEDS[1:]) for k in labels]
        cost = statistics.fmean(by[(k, REFERENCE, s)]["cpu_s"] for k in labels for s in REFERENCE_SEEDS)
        entry = {"layers": len(labels), "cpu_s_per_eval": cost, **agreement(one, rest),
                 "top_half": agreement([o for k, o in zip(labels, one) if k in top],
                                       [r for k, r in zip(labels, rest) if k in top])}
        entry["spearman_per_cpu_s"] = entry["spearman"] / cost if cost else math.nan
        table["reference seed 0 vs seeds 1-2"] = entry
    scores = {k: {"reference": ref[k], **{s: by[(k, s, 0)]["mean"] for s in settings if (k, s, 0) in by}}
              for k in sorted(ref, key=lambda k: -ref[k])}
    return {"archs": list(archs), "settings": table, "scores": scores, "reference_config": REFERENCE_CONFIG,
            "setting_configs": {s: SETTINGS.get(s) for s in settings}}


def icc_oneway(scores: dict[str, list[float]], alpha: float = 0.05) -> dict:
    """Separability: one-way random-effects ANOVA of scores grouped by layer (the replicates of a
    layer are its seeds, each score already averaged over the architectures).

    Returns ICC(1) = (MSB - MSW) / (MSB + (k - 1) MSW), the share of the variance of one score
    that lies between layers (Shrout & Fleiss 1979), its (1 - alpha) interval from the F
    distribution (McGraw & Wong 1996, case 1), F, its p-value, and the two mean squares.
    Balanced: every layer contributes its first k scores, k = the fewest any layer has
    (layers with fewer than 2 are left out)."""
    import numpy as np
    from scipy import stats

    rows = {k: list(v) for k, v in scores.items() if len(v) >= 2}
    out = {"layers": len(rows), "seeds": 0, "icc": math.nan, "icc_ci": [math.nan, math.nan], "f": math.nan,
           "p": math.nan, "ms_between": math.nan, "ms_within": math.nan}
    if len(rows) < 2:
        return out
    k = min(len(v) for v in rows.values())
    x = np.array([v[:k] for v in rows.values()], dtype=float)  # (n layers, k seeds)
    n = len(x)
    means = x.mean(axis=1)
    msb = k * ((means - x.mean()) ** 2).sum() / (n - 1)
    msw = ((x - means[:, None]) ** 2).sum() / (n * (k - 1))
    df1, df2 = n - 1, n * (k - 1)
    out.update(seeds=k, ms_between=float(msb), ms_within=float(msw))
    if msw == 0:
        out.update(icc=1.0 if msb > 0 else math.nan, f=math.inf if msb > 0 else math.nan,
                   p=0.0 if msb > 0 else math.nan)
        return out
    f = msb / msw
    lo_f = f / stats.f.ppf(1 - alpha / 2, df1, df2)
    hi_f = f * stats.f.ppf(1 - alpha / 2, df2, df1)
    out.update(icc=float((msb - msw) / (msb + (k - 1) * msw)),
               icc_ci=[float((lo_f - 1) / (lo_f + k - 1)), float((hi_f - 1) / (hi_f + k - 1))],
               f=float(f), p=float(stats.f.sf(f, df1, df2)))
    return out


def bootstrap_rho(reference: list[float], proxies: list[list[float]], baseline: list[list[float]] | None = None,
                  n_resamples: int = 2000, seed: int = 0) -> dict:
    """Spearman of each list in `proxies` against `reference` (all indexed by layer), averaged
    over the lists; with a 95% percentile bootstrap interval over layers (the same resampled
    layers for every list). With `baseline` (lists in the same layer order), also the difference
    (this statistic minus the baseline's), bootstrapped on the same resamples."""
    import numpy as np
    from scipy import stats

    ref = np.asarray(reference, dtype=float)
    xs = [np.asarray(p, dtype=float) for p in proxies]
    bs = [np.asarray(p, dtype=float) for p in baseline] if baseline else None

    def stats_of(lists, rows):
        """The lists' mean Spearman against the reference on each row of layer indices `rows`:
        Pearson's r of the average ranks (as scipy.stats.spearmanr); a row with a constant
        ranking has none (nan)."""
        refs = stats.rankdata(ref[rows], axis=1)
        refs -= refs.mean(axis=1, keepdims=True)
        vals = []
        for p in lists:
            ranks = stats.rankdata(p[rows], axis=1)
            ranks -= ranks.mean(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                vals.append((ranks * refs).sum(axis=1)
                            / np.sqrt((ranks ** 2).sum(axis=1) * (refs ** 2).sum(axis=1)))
        return np.mean(vals, axis=0)

    out = {"n": len(ref), "rho": math.nan, "ci": [math.nan, math.nan], "diff": math.nan,
           "diff_ci": [math.nan, math.nan]}
    if len(ref) < 3 or not xs:
        return out
    everything = np.arange(len(ref))[None]  # one row: every layer once
    out["rho"] = float(stats_of(xs, everything)[0])
    if bs:
        out["diff"] = out["rho"] - float(stats_of(bs, everything)[0])
    if len(ref) < 5:
        return out
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.integers(0, len(ref), len(ref)) for _ in range(n_resamples)])  # drawn one by one, as ever
    draws = stats_of(xs, rows)
    ok = ~np.isnan(draws)  # a resample with a constant ranking has no rho
    out["ci"] = [float(np.percentile(draws[ok], 2.5)), float(np.percentile(draws[ok], 97.5))]
    if bs:
        diffs = draws - stats_of(bs, rows)
        ok = ~np.isnan(diffs)
        out["diff_ci"] = [float(np.percentile(diffs[ok], 2.5)), float(np.percentile(diffs[ok], 97.5))]
    return out


def good_summary(rows: list[dict], layers: list[str] = GOOD_LAYERS, archs: list[str] = ARCHS,
                 baseline: str = "digits", no_groups: set[str] | None = None) -> dict:
    """Round 2: per proxy, its cost, its separability among the good layers and its fidelity to
    the reference's seed-mean ranking, over the layers that have the reference and the proxy.
    `no_groups`: the layers without group statistics, read from a `GROUPS_BASE` proxy's runs
    (default: computed from the layers' graphs)."""
    import statistics

    if no_groups is None:
        table = good_layer_table(FOUND_DIR, tuple(layers))
        no_groups = {k for k, v in table.items() if not uses_groups(v)}

    by = scores_by_key(rows, list(archs))
    for name, base in GROUPS_BASE.items():  # layers without group statistics: the base's runs
        for (label, setting, seed), value in list(by.items()):
            if setting == f"r2/{base}" and (label, f"r2/{name}", seed) not in by and label in no_groups:
                by[(label, f"r2/{name}", seed)] = value
    ref_seeds = {k: [by[(k, REFERENCE2, s)]["mean"] for s in REFERENCE2_SEEDS if (k, REFERENCE2, s) in by]
                 for k in layers}
    ref_seeds = {k: v for k, v in ref_seeds.items() if v}
    ref = {k: statistics.fmean(v) for k, v in ref_seeds.items()}
    ref_cost = [by[(k, REFERENCE2, s)]["cpu_s"] for k in ref for s in REFERENCE2_SEEDS if (k, REFERENCE2, s) in by]

    def seeds_of(setting, label):
        return [s for s in PROXY_SEEDS if (label, setting, s) in by]

    table = {}
    for name in PROXIES:
        setting = f"r2/{name}"
        have = {k: seeds_of(setting, k) for k in ref}
        have = {k: v for k, v in have.items() if v}
        if not have:
            continue
        common = [s for s in PROXY_SEEDS if all(s in v for v in have.values())]
        labels = sorted(have)
        y = [ref[k] for k in labels]
        cost = statistics.median(by[(k, setting, s)]["cpu_s"] for k in labels for s in have[k])
        seed0 = [by[(k, setting, PROXY_SEEDS[0])]["mean"] for k in labels] if PROXY_SEEDS[0] in common else None
        singles = [[by[(k, setting, s)]["mean"] for k in labels] for s in common]
        mean = [statistics.fmean(by[(k, setting, s)]["mean"] for s in common) for k in labels] if common else None
        # the baseline proxy on the same layers and seeds, for paired differences
        base_ok = name != baseline and all((k, f"r2/{baseline}", s) in by for k in labels for s in common)
        b_singles = ([[by[(k, f"r2/{baseline}", s)]["mean"] for k in labels] for s in common]
                     if base_ok else None)
        b_mean = ([[statistics.fmean(by[(k, f"r2/{baseline}", s)]["mean"] for s in common) for k in labels]]
                  if base_ok and common else None)
        entry = {
            "layers": len(labels), "seeds": len(common), "cpu_s_per_eval": cost,
            "separability": icc_oneway({k: [by[(k, setting, s)]["mean"] for s in common] for k in labels}),
            "rho_seed0": bootstrap_rho(y, [seed0], b_singles[:1] if b_singles else None) if seed0 else None,
            "rho_one_seed": bootstrap_rho(y, singles, b_singles) if singles else None,
            "rho_seed_mean": bootstrap_rho(y, [mean], b_mean) if mean and len(common) > 1 else None,
        }
        one = entry["rho_one_seed"]["rho"] if entry["rho_one_seed"] else math.nan
        entry["rho_one_seed_per_cpu_s"] = one / cost if cost else math.nan
        mean_rho = entry["rho_seed_mean"]["rho"] if entry["rho_seed_mean"] else math.nan
        entry["rho_seed_mean_per_cpu_s"] = mean_rho / (cost * len(common)) if cost and common else math.nan
        table[name] = entry
    # the reference against itself: how separable the good layers are there, and how well one of
    # its seeds ranks them against another (the ceiling for any 1-seed measurement)
    reference = {"layers": len(ref), "seeds": [min(map(len, ref_seeds.values()), default=0),
                                               max(map(len, ref_seeds.values()), default=0)],
                 "cpu_s_per_eval": statistics.median(ref_cost) if ref_cost else math.nan,
                 "separability": icc_oneway(ref_seeds)}
    pair = [k for k in ref if len(ref_seeds[k]) >= 2]
    if len(pair) >= 3:
        reference["rho_seed_vs_seed"] = bootstrap_rho([ref_seeds[k][0] for k in pair],
                                                      [[ref_seeds[k][1] for k in pair]])
    scores = {k: {"reference": ref[k], "reference_seeds": ref_seeds[k],
                  **{name: [by[(k, f"r2/{name}", s)]["mean"] for s in PROXY_SEEDS if (k, f"r2/{name}", s) in by]
                     for name in PROXIES}}
              for k in sorted(ref, key=lambda k: -ref[k])}
    return {"archs": list(archs), "baseline": baseline, "reference": reference, "proxies": table,
            "scores": scores, "reference_config": REFERENCE2_CONFIG, "reference_seeds": list(REFERENCE2_SEEDS),
            "proxy_seeds": list(PROXY_SEEDS), "proxy_configs": PROXIES}


def print_good_report(summary: dict) -> None:
    def f(v, fmt=".2f"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    def rho(e, diff=True):
        if not e:
            return "-"
        text = f"{f(e['rho'])} [{f(e['ci'][0])}, {f(e['ci'][1])}]"
        return text

    def delta(e):
        if not e or math.isnan(e["diff"]):
            return "-"
        return f"{e['diff']:+.2f} [{f(e['diff_ci'][0], '+.2f')}, {f(e['diff_ci'][1], '+.2f')}]"

    r = summary["reference"]
    sep = r["separability"]
    print(f"Reference {REFERENCE2}: {r['layers']} layers, {r['seeds'][0]}-{r['seeds'][1]} seeds each, "
          f"{f(r['cpu_s_per_eval'], '.1f')} CPU-s per evaluation (median); separability ICC "
          f"{f(sep['icc'])} [{f(sep['icc_ci'][0])}, {f(sep['icc_ci'][1])}] (F {f(sep['f'], '.1f')}, "
          f"p {f(sep['p'], '.2g')}, {sep['seeds']} seeds)"
          + (f"; one seed against another: Spearman {rho(r['rho_seed_vs_seed'])}" if "rho_seed_vs_seed" in r else ""))
    print()
    base = summary["baseline"]
    print(f"| proxy | layers x seeds | CPU s / eval | separability ICC [95% CI] | Spearman, seed 0 | "
          f"Spearman, 1 seed (mean over seeds) | minus {base}'s | Spearman, seed mean | minus {base}'s | "
          f"1-seed rho per CPU-s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, e in summary["proxies"].items():
        s = e["separability"]
        print(f"| {name} | {e['layers']} x {e['seeds']} | {f(e['cpu_s_per_eval'], '.1f')} | "
              f"{f(s['icc'])} [{f(s['icc_ci'][0])}, {f(s['icc_ci'][1])}] | {rho(e['rho_seed0'])} | "
              f"{rho(e['rho_one_seed'])} | {delta(e['rho_one_seed'])} | {rho(e['rho_seed_mean'])} | "
              f"{delta(e['rho_seed_mean'])} | {f(e['rho_one_seed_per_cpu_s'], '.3f')} |")
    print()
    names = list(summary["proxies"])
    print("| layer | reference (seeds) | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for k, v in summary["scores"].items():
        cells = [f(statistics_mean(v[n]), ".3f") + (f" ({len(v[n])})" if v[n] else "") for n in names]
        print(f"| {k} | {v['reference']:.3f} ({len(v['reference_seeds'])}) | " + " | ".join(cells) + " |")


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def recommend(table: dict, goal: float = 0.8) -> str:
    proxies = {s: e for s, e in table.items() if s in SETTINGS and not math.isnan(e["spearman"])}
    if not proxies:
        return "no setting has results yet"
    reaching = {s: e for s, e in proxies.items() if e["spearman"] >= goal}
    best_rate = max(proxies, key=lambda s: proxies[s]["spearman_per_cpu_s"])
    lines = [f"best Spearman per CPU-second: {best_rate} "
             f"(rho {proxies[best_rate]['spearman']:.2f}, {proxies[best_rate]['cpu_s_per_eval']:.1f} CPU-s)"]
    if reaching:
        # equal costs (to 0.1 CPU-s, well inside the noise of a loaded box): the better rho
        cheapest = min(reaching, key=lambda s: (round(reaching[s]["cpu_s_per_eval"], 1), -reaching[s]["spearman"]))
        lines.append(f"cheapest setting with Spearman >= {goal}: {cheapest} "
                     f"(rho {reaching[cheapest]['spearman']:.2f}, {reaching[cheapest]['cpu_s_per_eval']:.1f} CPU-s)")
    else:
        best = max(proxies, key=lambda s: proxies[s]["spearman"])
        lines.append(f"no setting reaches Spearman {goal}; the best is {best} (rho {proxies[best]['spearman']:.2f})")
    return "\n".join(lines)


def print_report(summary: dict) -> None:
    def f(v, fmt=".2f"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    print("| setting | layers | CPU s / eval | Spearman [95% CI] | Kendall | Spearman, top half [95% CI] | rho per CPU-s |")
    print("|---|---|---|---|---|---|---|")
    for s, e in summary["settings"].items():
        lo, hi = e["spearman_ci"]
        print(f"| {s} | {e['layers']} | {f(e['cpu_s_per_eval'], '.1f')} | {f(e['spearman'])} [{f(lo)}, {f(hi)}] "
              f"| {f(e['kendall'])} | {f(e['top_half']['spearman'])} [{f(e['top_half']['spearman_ci'][0])}, "
              f"{f(e['top_half']['spearman_ci'][1])}] (n={e['top_half']['n']}) "
              f"| {f(e['spearman_per_cpu_s'], '.3f')} |")
    print()
    names = [s for s in next(iter(summary["scores"].values()), {}) if s != "reference"]
    print("| layer | reference (3 seeds) | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for k, v in summary["scores"].items():
        print(f"| {k} | {v['reference']:.3f} | " + " | ".join(f(v.get(s), ".3f") for s in names) + " |")
    print()
    print(recommend(summary["settings"]))


# -- commands --------------------------------------------------------------------------------

def _custom(args) -> dict:
    custom = {}
    for item in args.setting or []:
        name, _, value = item.partition("=")
        try:
            custom[name] = json.loads(value)
        except json.JSONDecodeError as e:
            raise SystemExit(f"fidelity: --setting {name}: not JSON: {e}")
    return custom


def plan(args) -> None:
    custom = _custom(args)
    settings = args.settings.split(",") if args.settings else list(SETTINGS) + list(custom)
    layers = layer_table(args.known.split(","), Path(args.found))
    per_layer = 0.0
    print("| setting | seeds | bn_relu CPU s | bn_relu mean acc |")
    print("|---|---|---|---|")
    _init_worker()
    path = Path(args.results)
    cached = {(r["layer"], r["setting"], r["seed"], r["config"]): r for r in read_results(path)}
    for s in [REFERENCE] + settings:
        config = config_of(s, custom)
        r = cached.get((args.layer, s, 0, config_hash(config)))
        if r is None:  # kept in the results file: the run then skips it
            r = evaluate_one(args.layer, args.layer, s, 0, config)
            with open(path, "a") as out:
                out.write(json.dumps(r) + "\n")
        seeds = len(REFERENCE_SEEDS) if s == REFERENCE else 1
        per_layer += seeds * r["cpu_s"]
        print(f"| {s} | {seeds} | {r['cpu_s']:.1f} | {r['mean']:.3f} |", flush=True)
    print(f"\n{len(layers)} layers x {per_layer:.0f} CPU s = {len(layers) * per_layer / 60:.0f} CPU-minutes "
          f"(from {args.layer}; weak layers that diverge stop early)")


def report_all(rows: list[dict], layers: list[str] | None, custom: dict, as_json: bool) -> None:
    """The tables over the first architecture, the first two, ... (as far as results go)."""
    summaries = []
    for n in range(1, len(ARCHS) + 1):
        summary = summarize(rows, layers, ARCHS[:n], custom)
        if summary["scores"]:
            summaries.append(summary)
    if as_json:
        print(json.dumps(summaries, indent=1))
        return
    for summary in summaries:
        print(f"\n### Architectures: {', '.join(summary['archs'])}\n")
        print_report(summary)


def run(args) -> None:
    custom = _custom(args)
    settings = args.settings.split(",") if args.settings else list(SETTINGS) + list(custom)
    layers = layer_table(args.known.split(","), Path(args.found))
    path = Path(args.results)
    run_jobs(jobs_for(layers, settings, custom, args.first, args.archs.split(",")), path, args.workers)
    report_all(read_results(path), list(layers), custom, False)


def good_layer_table(found_dir: Path, labels: tuple[str, ...] = GOOD_LAYERS) -> dict[str, str]:
    table = layer_table(list(KNOWN_LAYERS), found_dir)
    missing = [x for x in labels if x not in table]
    if missing:
        raise SystemExit(f"fidelity: good layers not found: {', '.join(missing)}")
    return {x: table[x] for x in labels}


def good_report(args) -> None:
    rows = read_results(Path(args.results))
    archs = args.archs.split(",")
    summary = good_summary(rows, GOOD_LAYERS, archs, args.baseline)
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"### Architectures: {', '.join(archs)}\n")
    print_good_report(summary)


def good_run(args) -> None:
    proxies = args.proxies.split(",") if args.proxies else list(PROXIES)
    layers = good_layer_table(Path(args.found))
    run_jobs(good_jobs(layers, proxies, args.archs.split(","), args.first), Path(args.results), 1)


def report(args) -> None:
    report_all(read_results(Path(args.results)), None, _custom(args), args.json)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="store evaluated candidates of searches as graph JSON")
    p.add_argument("--storage", action="append", required=True, help="Optuna storage URL (repeat per study)")
    p.add_argument("--study", action="append", required=True, help="study name (same order as --storage)")
    p.add_argument("--count", type=int, default=6, help="layers per study, spread over the scores")
    p.add_argument("--out", default=str(FOUND_DIR))
    p.add_argument("--trials", action="append", default=[], metavar="STUDY=N,N,...",
                   help="take these trials of a study instead of a spread over its scores")
    p.add_argument("--command-line", action="append", default=[], metavar="STUDY=COMMAND",
                   help="the search command of a study, recorded with its layers")
    p.set_defaults(func=collect)

    for name, func in (("plan", plan), ("run", run)):
        p = sub.add_parser(name)
        p.add_argument("--known", default=",".join(KNOWN_LAYERS))
        p.add_argument("--found", default=str(FOUND_DIR))
        p.add_argument("--settings", default=None, help="comma-separated (default: all)")
        p.add_argument("--setting", action="append", metavar="NAME=JSON",
                       help="an extra setting: EvalConfig overrides as JSON")
        p.set_defaults(func=func)
        p.add_argument("--results", default="fidelity.jsonl")
        if name == "plan":
            p.add_argument("--layer", default="bn_relu")
        else:
            p.add_argument("--workers", type=int, default=2)
            p.add_argument("--archs", default=",".join(ARCHS), help="in the order a run covers them")
            p.add_argument("--first", type=int, default=3,
                           help="settings run beside the reference, layer by layer (the rest follow)")

    p = sub.add_parser("good-run", help="round 2: the good layers, proxies with 3 seeds, the 14x14 reference")
    p.add_argument("--results", default=str(HERE / "fidelity_good.jsonl"))
    p.add_argument("--found", default=str(FOUND_DIR))
    p.add_argument("--proxies", default=None, help="comma-separated (default: all of PROXIES)")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--first", type=int, default=None,
                   help="proxies whose second seed runs layer by layer with the reference's (default: all)")
    p.set_defaults(func=good_run)

    p = sub.add_parser("good-report", help="round 2: the tables")
    p.add_argument("--results", default=str(HERE / "fidelity_good.jsonl"))
    p.add_argument("--archs", default=",".join(ARCHS), help="the architectures a score averages over")
    p.add_argument("--baseline", default="digits", help="the proxy the differences are taken against")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=good_report)

    p = sub.add_parser("report")
    p.add_argument("--results", default="fidelity.jsonl")
    p.add_argument("--json", action="store_true")
    p.add_argument("--setting", action="append", metavar="NAME=JSON", help="as given to run")
    p.set_defaults(func=report)

    args = parser.parse_args(argv)
    if args.command == "collect":
        if len(args.storage) != len(args.study):
            parser.error("give one --storage per --study")
        args.commands = dict(c.split("=", 1) for c in args.command_line)
        args.trials = {k: {int(n) for n in v.split(",")} for k, v in (t.split("=", 1) for t in args.trials)}
    args.func(args)


if __name__ == "__main__":
    main()
