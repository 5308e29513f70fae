"""``spf`` command line: ``estimate``, ``train``, ``data``, ``align``, ``eval`` and the pipeline stages
(``prepare``, ``align``, ``estimate``, ``finetune``, ``evaluate`` with ``--params params.yaml``).

Errors a user can fix (bad file, unknown model, a prompt the model does not refuse) print one line
``spf: error: …`` and exit with status 2; nothing partial is written. A training run aborted on a fault
(non-finite loss or gradient, safety-loss drift past ``abort_safety_rise``) prints ``spf: aborted: …`` and
exits with status 3, leaving ``abort.json`` and no finished adapter.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

__all__ = ["main"]

logger = logging.getLogger("spf")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when present)")
    p.add_argument("-v", "--verbose", action="store_true")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spf", description="Safety-preserving fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)

    e = sub.add_parser(
        "estimate", help="estimate the safety subspace from one (harmful prompt, refusal) sample"
    )
    e.add_argument("--model", help="smollm2-135m-instruct | local folder | hub id | tiny-llama")
    e.add_argument("--sample", help="file of candidate samples (JSON/JSONL/CSV/TSV)")
    e.add_argument("--index", type=int, default=None, help="record to use (default: first the model refuses)")
    e.add_argument("--rank", type=int, help="k, singular directions kept per module")
    e.add_argument("--out", help="output folder")
    e.add_argument(
        "--own-response",
        action="store_true",
        help="ignore a response in the file and use the model's own answer (it must be a refusal)",
    )
    e.add_argument(
        "--batch", type=int, default=1, help="estimate from the first N refused samples (comparison)"
    )
    e.add_argument(
        "--loss",
        choices=["ce", "margin"],
        default="ce",
        help="ce: the refusal's cross-entropy (the paper); margin: CE(refusal) − CE(compliant opening)",
    )
    e.add_argument("--modules", nargs="*", default=None, help="module names (default: all decoder linears)")
    e.add_argument("--max-length", type=int, default=512)
    e.add_argument("--max-new-tokens", type=int, default=64, help="for generating the model's own answer")
    _add_common(e)

    from typing import get_args

    from spf.train.config import Method

    t = sub.add_parser(
        "train", help="fine-tune (vanilla, SPF or a baseline defense) with LoRA or full fine-tuning"
    )
    t.add_argument("--config", default=None, help="YAML/JSON with TrainConfig fields; flags override it")
    t.add_argument("--model")
    t.add_argument("--data")
    t.add_argument("--out")
    t.add_argument("--method", choices=list(get_args(Method)), help="baselines: see docs/baselines.md")
    t.add_argument("--finetune", choices=["lora", "full"])
    t.add_argument("--subspace", help="folder from `spf estimate`")
    t.add_argument("--safety-sample", help="instead of --subspace: sample file, estimated at step 0")
    t.add_argument("--sample-index", type=int)
    t.add_argument("--mode", choices=["conflict", "always"])
    t.add_argument("--project-on", choices=["update", "grad"])
    t.add_argument("--conflict-scope", choices=["module", "global"])
    t.add_argument("--refresh-every", type=int, help="re-estimate every T steps (0 = never)")
    t.add_argument("--rank", type=int)
    t.add_argument("--lora-r", type=int)
    t.add_argument("--lora-alpha", type=float)
    t.add_argument("--steps", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--max-length", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--save-every", type=int)
    t.add_argument("--eval-every", type=int)
    t.add_argument("--heldout-safety", help="(harmful prompt, refusal) pairs whose loss is tracked")
    t.add_argument("--heldout-n", type=int)
    t.add_argument(
        "--abort-safety-rise",
        type=float,
        help="abort (exit 3, abort.json) when a tracked refusal loss rises above its step-0 value by more",
    )
    t.add_argument("--limit", type=int, dest="limit_data")
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--safety-data", help="safeinstr/safegrad/lisa: (harmful prompt, refusal) pairs")
    t.add_argument("--safeinstr-fraction", type=float, help="safeinstr: demos added per task sample")
    t.add_argument("--safegrad-batch", type=int, help="safegrad: safety pairs per safety gradient")
    t.add_argument("--safegrad-every", type=int, help="safegrad: project every N steps")
    t.add_argument("--safegrad-scope", choices=["global", "module"])
    t.add_argument("--lisa-align-steps", type=int, help="lisa: safety-data steps per cycle")
    t.add_argument("--lisa-task-steps", type=int, help="lisa: task-data steps per cycle")
    t.add_argument("--lisa-rho", type=float, help="lisa: proximal weight")
    _add_common(t)

    d = sub.add_parser("data", help="build fine-tuning datasets (threat scenarios) from public sources")
    d.add_argument(
        "kind",
        choices=[
            "sst2",
            "agnews",
            "gsm8k",
            "harmful-mix",
            "identity-shift",
            "harmful-compliance",
            "refusals",
        ],
        help="task sets; harmful-mix (fraction --p of AdvBench compliance pairs in a --base task set); "
        "identity-shift (the 10 AOA conversations); harmful-compliance and refusals read --src files",
    )
    d.add_argument("--src", nargs="+", help="harmful-compliance: CSV TARGETS_JSON; refusals: JSON; sst2: TSV")
    d.add_argument("--shared-data", default=None, help="public data folder (default: ../shared/data)")
    d.add_argument("--n", type=int, default=None)
    d.add_argument("--p", type=float, default=0.1, help="harmful fraction for harmful-mix")
    d.add_argument("--base", choices=["sst2", "agnews", "gsm8k"], default="sst2")
    d.add_argument("--split", choices=["train", "eval"], default="train")
    d.add_argument("--epochs", type=int, default=1, help="repeat the set (deep fine-tuning)")
    d.add_argument("--offset", type=int, default=0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True)

    from spf.align import add_align_arguments
    from spf.eval.suites import add_eval_arguments

    ev = sub.add_parser("eval", help="safety / utility evaluation → results.json + samples.jsonl")
    add_eval_arguments(ev)
    _add_common(ev)

    al = sub.add_parser("align", help="make a safety-aligned base model (LoRA SFT merged into full weights)")
    add_align_arguments(al)

    from spf.analysis.measure import add_analyze_arguments

    an = sub.add_parser("analyze", help="insights I-III: CER, cosine, overlap → analysis.json + PNGs")
    add_analyze_arguments(an)
    _add_common(an)

    from spf.bench.run import add_bench_arguments

    bn = sub.add_parser("bench", help="every defense × threat scenario (+ ablations) → docs/results.md")
    add_bench_arguments(bn)

    # Pipeline stages (what dvc.yaml runs): every knob comes from params.yaml; `-S key=value` overrides.
    stage_help = {
        "prepare": "pipeline stage: fine-tuning data, safety samples, held-out harmful prompts",
        "finetune": "pipeline stage: vanilla/SPF fine-tuning of the aligned base",
        "evaluate": "pipeline stage: safety + utility evaluation of the fine-tuned model",
    }
    for name, text in stage_help.items():
        sp = sub.add_parser(name, help=text)
        _add_params_args(sp, required=True)
    for sp in (e, al, an):
        _add_params_args(sp, required=False)
    return parser


def _add_params_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "--params",
        required=required,
        help="pipeline parameter file (params.yaml): run this as a pipeline stage"
        + ("" if required else "; other options are then ignored"),
    )
    p.add_argument(
        "-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter"
    )


def cmd_stage(args: argparse.Namespace) -> int:
    from spf.pipeline.params import load_params
    from spf.pipeline.stages import run_stage

    stage = args.command
    params = load_params(args.params, args.set)
    summary = run_stage(stage, params)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _summarise_cer(sub: Any, ks: tuple[int, ...] = (1, 5, 10, 20)) -> str:
    """Mean CER@k per module kind (q_proj, …) — 210 rows of the full table live in cer.json."""
    kinds: dict[str, list[str]] = defaultdict(list)
    for name in sub.modules:
        kinds[name.rsplit(".", 1)[-1]].append(name)
    cers = {k: sub.cer(k) for k in ks}
    lines = [f"{'module kind':<14}{'n':>4}  " + "  ".join(f"CER@{k:<3}" for k in ks)]
    for kind, names in kinds.items():
        vals = [sum(cers[k][n] for n in names) / len(names) for k in ks]
        lines.append(f"{kind:<14}{len(names):>4}  " + "  ".join(f"{v:7.3f}" for v in vals))
    lines.append(f"{'all':<14}{len(sub.modules):>4}  " + "  ".join(f"{sub.mean_cer(k):7.3f}" for k in ks))
    return "\n".join(lines)


def cmd_estimate(args: argparse.Namespace) -> int:
    import torch

    from spf.core.subspace import estimate_from_samples, publish_estimate
    from spf.data.samples import load_samples
    from spf.models import load_model
    from spf.refusal import select_safety_samples

    missing = [f"--{k}" for k in ("model", "sample", "rank", "out") if getattr(args, k) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or run the pipeline stage with --params FILE)")
    if args.rank < 1:
        raise ValueError(f"--rank must be ≥ 1, got {args.rank}")
    if args.threads:
        torch.set_num_threads(args.threads)
    candidates = load_samples(args.sample)
    model, tok = load_model(args.model, device=args.device)
    # written refusals are used as they are unless --own-response, or when the chosen record(s) lack one
    if args.index is not None and 0 <= args.index < len(candidates):
        lacking = candidates[args.index].response is None
    else:
        lacking = any(c.response is None for c in candidates[: max(1, args.batch)])
    samples = select_safety_samples(
        model,
        tok,
        candidates,
        n=args.batch,
        own_response=args.own_response or lacking,
        index=args.index,
        max_new_tokens=args.max_new_tokens,
    )
    sub, used = estimate_from_samples(
        model,
        tok,
        samples,
        rank=args.rank,
        loss=args.loss,
        modules=args.modules,
        max_length=args.max_length,
        model_ref=args.model,
    )
    out = publish_estimate(sub, used, args.out)
    print(
        f"sample: {samples[0].prompt[:100]!r} → {samples[0].response[:100]!r}"
        + (f" (+{len(samples) - 1})" if len(samples) > 1 else "")
    )
    print(
        f"safety loss {sub.metadata['safety_loss']:.4f} over {sub.metadata['n_tokens']} tokens; rank {sub.rank}"
    )
    print(_summarise_cer(sub))
    print(f"wrote {out}/subspace.safetensors, subspace.json, sample.jsonl, cer.json")
    return 0


_TRAIN_FLAT = (
    "model", "data", "out", "method", "finetune", "steps", "lr", "weight_decay", "batch_size", "grad_accum",
    "max_length", "seed", "save_every", "eval_every", "heldout_safety", "heldout_n", "limit_data", "threads",
    "device", "abort_safety_rise",
)  # fmt: skip
_TRAIN_SPF = {
    "subspace": "subspace",
    "safety_sample": "sample",
    "sample_index": "sample_index",
    "mode": "mode",
    "project_on": "project_on",
    "conflict_scope": "conflict_scope",
    "refresh_every": "refresh_every",
    "rank": "rank",
}
# flag --safety-data → baselines.safety_data, and so on
_TRAIN_BASELINES = (
    "safety_data", "safeinstr_fraction", "safegrad_batch", "safegrad_every", "safegrad_scope",
    "lisa_align_steps", "lisa_task_steps", "lisa_rho",
)  # fmt: skip


def _train_config(args: argparse.Namespace):
    from spf.train.config import TrainConfig

    cfg: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        loaded = (
            yaml.safe_load(path.read_text())
            if path.suffix in (".yaml", ".yml")
            else json.loads(path.read_text())
        )
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of TrainConfig fields")
        cfg.update(loaded)
    for key in _TRAIN_FLAT:
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    spf = dict(cfg.get("spf") or {})
    for flag, key in _TRAIN_SPF.items():
        if getattr(args, flag) is not None:
            spf[key] = getattr(args, flag)
    cfg["spf"] = spf
    baselines = dict(cfg.get("baselines") or {})
    for key in _TRAIN_BASELINES:
        if getattr(args, key) is not None:
            baselines[key] = getattr(args, key)
    cfg["baselines"] = baselines
    lora = dict(cfg.get("lora") or {})
    if args.lora_r is not None:
        lora["r"] = args.lora_r
    if args.lora_alpha is not None:
        lora["alpha"] = args.lora_alpha
    cfg["lora"] = lora
    if args.no_resume:
        cfg["resume"] = False
    missing = [k for k in ("model", "data", "out") if not cfg.get(k)]
    if missing:
        raise ValueError(f"missing required option(s): {', '.join('--' + m for m in missing)}")
    return TrainConfig.from_dict(cfg)


def cmd_train(args: argparse.Namespace) -> int:
    from spf.train.loop import train

    cfg = _train_config(args)
    result = train(cfg)
    s = result.metrics["summary"]
    print(json.dumps(s, indent=2))
    print(f"wrote {result.out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from spf.data import scenarios
    from spf.data.locate import require_shared_data
    from spf.data.samples import save_samples

    if args.kind in ("harmful-compliance", "refusals") or (args.kind == "sst2" and args.src):
        if not args.src:
            raise ValueError(f"{args.kind} needs --src")
        if args.kind == "sst2":
            samples = scenarios.sst2(args.src[0], n=args.n, seed=args.seed)
        elif args.kind == "harmful-compliance":
            if len(args.src) != 2:
                raise ValueError("harmful-compliance needs --src BEHAVIORS_CSV TARGETS_JSON")
            samples = scenarios.harmful_compliance(
                args.src[0], args.src[1], n=args.n, seed=args.seed, offset=args.offset
            )
        else:
            samples = scenarios.refusal_pairs(args.src[0], n=args.n, seed=args.seed, offset=args.offset)
    else:
        samples = scenarios.build_scenario(
            args.kind,
            shared_data=require_shared_data(args.shared_data),
            n=args.n,
            p=args.p,
            seed=args.seed,
            base=args.base,
            split=args.split,
        )
    if args.epochs > 1:
        samples = scenarios.repeat_epochs(samples, args.epochs, seed=args.seed)
    save_samples(samples, args.out)
    print(f"wrote {len(samples)} samples to {args.out}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from spf.analysis.measure import main_analyze

    return main_analyze(args)


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from spf.align import main_align
    from spf.bench.run import main_bench
    from spf.data.samples import DataError
    from spf.eval.judges import JudgeError
    from spf.eval.suites import main_eval
    from spf.models import ModelLoadError
    from spf.pipeline.params import ParamsError
    from spf.train.loop import TrainingAborted

    handler = cmd_stage if getattr(args, "params", None) else None
    handlers = {
        "estimate": cmd_estimate,
        "train": cmd_train,
        "data": cmd_data,
        "align": main_align,
        "eval": main_eval,
        "analyze": cmd_analyze,
        "bench": main_bench,
    }
    try:
        return (handler or handlers[args.command])(args)
    except TrainingAborted as e:
        where = f" ({e.path})" if e.path is not None else ""
        print(f"spf: aborted: {e.reason} at step {e.step}{where}", file=sys.stderr)
        return 3
    except (ParamsError, DataError, ModelLoadError, JudgeError, FileNotFoundError, ValueError) as e:
        # NotRefusedError is a ValueError: it names the prompt the model did not refuse
        print(f"spf: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
