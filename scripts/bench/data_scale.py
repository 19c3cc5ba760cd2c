#!/usr/bin/env python
"""Prepared data at real scale: prepare throughput and memory, and each rank's memory, start-up time and batch
loading when training reads corpora of 10 MiB, 100 MiB and 1 GiB of text.

    python scripts/bench/data_scale.py --work /tmp/databench --plot docs/img/data_scale.png --json /tmp/databench/out.json
    python scripts/bench/data_scale.py --work /tmp/databench-quick --sizes 2 8 --repeats 1   # a quick check
    python scripts/bench/data_scale.py --work /tmp/databench --alternate-only   # prepare against tokenizers only

In one run it
1. builds the corpora under --work: the standard library's `*.py` files (pydoc_data's help topics included)
   concatenated in a fixed order and repeated until each corpus holds --sizes MiB, in files of at most 64 MiB
   (reused when already there);
2. trains one tokenizer per architecture (seqpar's, `model.vocab_size` 4096) on the first --tokenizer-mib MiB, so
   every prepare below is given it (`data.tokenizer=`) and measures tokenization only;
3. compares a prepare with the `tokenizers` library's own `encode_batch` (and `encode_batch_fast`, the library's
   thread pool on all cores, batches of the prepare's size) on the same text: --rounds rounds of the library then
   a prepare of one --alternate-mib MiB corpus, back to back, since the load of a shared machine moves by several
   times within minutes; the library's rate is also measured on the first --sample-mib MiB of the largest corpus
   before and after the prepares of step 4;
4. runs `python -m seqpar.prepare` per corpus and architecture (`data=text_files data.sample_by=paragraph`),
   recording the wall time, the text rate (over the wall time, and the prepare's own rate line, which leaves out
   start-up), the largest process's peak resident set (`wait4`'s ru_maxrss) and the peak of the summed
   proportional set size (Pss) of the prepare's processes, sampled every 0.25 s (--reuse-prepared: an earlier
   run's datasets and numbers);
5. trains `gpt_tiny` and `bert_tiny` at `parallel.sp=2` on each prepared corpus for --steps steps (--repeats
   times, interleaved across corpora), reading `peak_mem_mib_per_rank` of the last step from metrics.jsonl (the
   resident high-water mark, mapped file pages included), the peak RssAnon and RssFile of the process with the
   largest resident set (a rank; sampled every 0.1 s from outside) and the wall time from starting `train.py` to
   its first metrics record; and, in this process, the time to open each dataset and take a first batch;
6. times `next(loader)` on the largest GPT corpus shaped for gpt2_small (`data.seq_len=1024`) against a gpt2_small
   training step at the same batch (`scripts/bench/throughput.py`'s step, as the trainer runs it).

Prints markdown tables; --plot draws peak memory per rank against corpus size; --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MIB = 2**20
FILE_MIB = 64  # a corpus is written in files of at most this many MiB
MODELS = {"gpt": "gpt_tiny", "bert": "bert_tiny"}


# ---------------------------------------------------------------------------------------------------- corpora


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def build_corpus(out: Path, mib: float) -> Path:
    """`out/part-NNN.txt`: the standard library's sources, repeated, `mib` MiB in all (cut at a line end)."""
    target = int(mib * MIB)
    done = out / "done.json"
    if done.is_file() and json.loads(done.read_text())["target"] == target:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for p in out.glob("part-*.txt"):
        p.unlink()
    texts = [p.read_bytes().decode("utf-8", errors="replace").encode() + b"\n\n" for p in stdlib_files()]
    written, part, f = 0, 0, None
    while written < target:
        progressed = False
        for text in texts:
            left = target - written
            if left <= 0:
                break
            if len(text) > left:
                text = text[: text.rfind(b"\n", 0, left) + 1]  # whole lines: the files stay valid UTF-8
            if not text:
                continue
            if f is None or f.tell() >= FILE_MIB * MIB:
                if f is not None:
                    f.close()
                f = open(out / f"part-{part:03d}.txt", "wb")
                part += 1
            f.write(text)
            written += len(text)
            progressed = True
        if not progressed:
            break
    f.close()
    done.write_text(json.dumps({"target": target, "bytes": written}))
    return out


def corpus_bytes(corpus: Path) -> int:
    return sum(p.stat().st_size for p in corpus.glob("part-*.txt"))


def text_config(corpus: Path, arch: str, tokenizer: str | None = None):
    from seqpar.config import Config, DataConfig, ModelConfig

    return Config(model=ModelConfig(arch=arch, vocab_size=4096),
                  data=DataConfig(source="text_files", paths=[str(corpus / "*.txt")], sample_by="paragraph",
                                  tokenizer=tokenizer))


def train_tokenizers(corpus: Path, work: Path, mib: float) -> dict[str, Path]:
    """One tokenizer per architecture, trained as a prepare trains it, on the first `mib` MiB of `corpus`."""
    from seqpar.data.prepared.encode import sample
    from seqpar.data.prepared.sources import documents
    from seqpar.data.tokenizer import train_tokenizer

    out = {}
    for arch in MODELS:
        path = work / f"tokenizer-{arch}"
        if not (path / "tokenizer.json").is_file():
            tok = train_tokenizer(arch, sample(documents(text_config(corpus, arch).data), mib), 4096)
            tok.save_pretrained(str(path))
        out[arch] = path
    return out


# ---------------------------------------------------------------------------------------------------- tokenizers


def tokenizers_rate(corpus: Path, tokenizer: Path, mib: float) -> dict:
    """MiB/s of text through `tokenizers`' `encode_batch` and `encode_batch_fast` (its own threads, all cores),
    in batches of the size a prepare encodes, on the first `mib` MiB of the documents a prepare reads."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from tokenizers import Tokenizer

    from seqpar.data.prepared.encode import BATCH_CHARS, batches, sample
    from seqpar.data.prepared.sources import documents

    texts = list(sample(documents(text_config(corpus, "gpt").data), mib))
    chunks = list(batches(texts, BATCH_CHARS))
    chars = sum(len(t) for t in texts)
    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    out = {"sample_mib": chars / MIB, "documents": len(texts)}
    for name in ("encode_batch", "encode_batch_fast"):
        fn = getattr(tok, name)
        start = time.perf_counter()
        tokens = sum(len(e.ids) for chunk in chunks for e in fn(chunk, add_special_tokens=False))
        seconds = time.perf_counter() - start
        out[name] = {"seconds": seconds, "mib_per_s": chars / MIB / seconds, "tokens": tokens}
    return out


# ---------------------------------------------------------------------------------------------------- processes


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    parents[int(entry.name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier]
        tree += frontier
    return tree


def _status_kib(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name = line.split(":", 1)[0]
            if name in fields:
                out[name] = int(line.split()[1])
    return out


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


class Watch:
    """Samples a process tree every `interval` s until stopped: each process's peak RssAnon / RssFile / VmRSS, the
    peak of the tree's summed Pss (with `pss`), and, with `metrics`, when that file gets its first record."""

    def __init__(self, pid: int, start: float, interval: float, pss: bool = False, metrics: Path | None = None):
        self.pid, self.start, self.interval, self.pss, self.metrics = pid, start, interval, pss, metrics
        self.peaks: dict[int, dict[str, int]] = {}
        self.tree_pss_kib = 0
        self.first_record_s: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.metrics is not None and self.first_record_s is None and self.metrics.is_file():
                if any('"loss"' in line for line in self.metrics.read_text().splitlines()):
                    self.first_record_s = time.perf_counter() - self.start
            pss = 0
            for pid in _descendants(self.pid):
                try:
                    s = _status_kib(pid, ("RssAnon", "RssFile", "VmRSS"))
                    pss += _pss_kib(pid) if self.pss else 0
                except OSError:
                    continue
                peak = self.peaks.setdefault(pid, {})
                for k, v in s.items():
                    peak[k] = max(peak.get(k, 0), v)
            self.tree_pss_kib = max(self.tree_pss_kib, pss)
            self.stop.wait(self.interval if self.first_record_s is not None or self.metrics is None else 0.02)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()

    def largest(self, field: str) -> float:
        """The peak of `field` (MiB) of the process with the largest resident set: a rank, in training."""
        peaks = max(self.peaks.values(), key=lambda p: p.get("VmRSS", 0), default={})
        return peaks.get(field, 0) / 1024


def run_watched(cmd: list[str], log: Path, interval: float, pss: bool = False, metrics: Path | None = None,
                env: dict | None = None) -> tuple[float, dict, Watch]:
    """Run `cmd` (output to `log`) while a `Watch` samples it: (wall seconds, wait4's rusage fields, the watch)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        watch = Watch(proc.pid, start, interval, pss, metrics)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    watch.finish()
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({proc.returncode}); its output is in {log}:\n"
                         + log.read_text()[-3000:])
    return seconds, {"maxrss_mib": usage.ru_maxrss / 1024}, watch


def child_env(work: Path) -> dict:
    return {**os.environ, "SEQPAR_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------------- prepare


def prepare(corpus: Path, arch: str, tokenizer: Path, out: Path, work: Path, num_proc: int | None,
            reuse: bool = False) -> dict:
    """Prepare `corpus` into `out` and measure it; `reuse`: an earlier run's dataset and numbers, if there."""
    import shutil

    record = out.with_name(out.name + ".json")
    if reuse and (out / "manifest.json").is_file() and record.is_file():
        return {**json.loads(record.read_text()), "reused": True}
    shutil.rmtree(out, ignore_errors=True)  # a fresh prepare each time: its timing is the measurement
    cmd = [sys.executable, "-m", "seqpar.prepare", "--out", str(out), f"model={MODELS[arch]}", "data=text_files",
           f"data.paths=[{corpus}/*.txt]", "data.sample_by=paragraph", f"data.tokenizer={tokenizer}"]
    if num_proc is not None:
        cmd.append(f"data.num_proc={num_proc}")
    log = out.with_name(out.name + ".log")
    seconds, usage, watch = run_watched(cmd, log, 0.25, pss=True, env=child_env(work))
    rate_lines = [line for line in log.read_text().splitlines() if line.startswith("prepare: ")]
    own_rate = float(rate_lines[-1].split("(")[1].split()[0]) if rate_lines else None
    manifest = json.loads((out / "manifest.json").read_text())
    text = corpus_bytes(corpus) / MIB
    row = {"arch": arch, "corpus_mib": text, "seconds": seconds, "mib_per_s": text / seconds,
            "own_mib_per_s": own_rate, "maxrss_mib": usage["maxrss_mib"], "tree_pss_mib": watch.tree_pss_kib / 1024,
            "processes": len(watch.peaks),
           "process_peak_rss_mib": sorted((p.get("VmRSS", 0) / 1024 for p in watch.peaks.values()), reverse=True), "documents": manifest["source"]["documents"],
            "tokens": sum(s["tokens"] for s in manifest["splits"].values()), "shards": len(manifest["shards"]),
            "disk_mib": sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / MIB}
    record.write_text(json.dumps(row, indent=2) + "\n")
    return row


def alternated(corpus: Path, arch: str, tokenizer: Path, work: Path, rounds: int, num_proc: int | None) -> dict:
    """The prepare's rate against `encode_batch`'s on the same text, measured back to back `rounds` times
    (encode_batch, then the prepare): on a shared machine the load moves by several times within minutes, so only
    neighbouring measurements are compared. Rates: the prepare's own line (its start-up left out, as it is from
    the library's) over `encode_batch` and `encode_batch_fast` on all the corpus's documents."""
    pairs = []
    mib = corpus_bytes(corpus) / MIB + 1
    for _ in range(rounds):
        probe = tokenizers_rate(corpus, tokenizer, mib)
        row = prepare(corpus, arch, tokenizer, work / f"prepared-alternated-{arch}", work, num_proc)
        pairs.append({"encode_batch": probe["encode_batch"]["mib_per_s"],
                      "encode_batch_fast": probe["encode_batch_fast"]["mib_per_s"],
                      "prepare": row["own_mib_per_s"], "prepare_wall": row["mib_per_s"], "tree_pss_mib": row["tree_pss_mib"],
                      "ratio": row["own_mib_per_s"] / probe["encode_batch"]["mib_per_s"]})
    return {"arch": arch, "corpus_mib": mib - 1, "rounds": pairs,
            "median_ratio": statistics.median(p["ratio"] for p in pairs)}


# ---------------------------------------------------------------------------------------------------- training


def train(arch: str, data: Path, run: Path, work: Path, steps: int) -> dict:
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "train.py", f"model={MODELS[arch]}", "data=prepared", f"data.path={data}", "parallel.sp=2",
           f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=1",
           "trainer.save_final=false", "trainer.threads=1", "checkpoint.at_end=false", "checkpoint.resume=never",
           f"hydra.run.dir={run}"]
    metrics = run / "metrics.jsonl"
    seconds, _, watch = run_watched(cmd, run.with_name(run.name + ".log"), 0.1, metrics=metrics, env=child_env(work))
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    last = [r for r in records if "loss" in r][-1]
    return {"first_step_s": watch.first_record_s, "seconds": seconds, "peak_mem_mib": last["peak_mem_mib"],
            "peak_mem_mib_per_rank": last.get("peak_mem_mib_per_rank", [last["peak_mem_mib"]]),
            "rss_anon_mib": watch.largest("RssAnon"), "rss_file_mib": watch.largest("RssFile"),
            "losses": [r["loss"] for r in records if "loss" in r]}


def open_data(data: Path, arch: str) -> dict:
    """The training windows of `data` for the tiny model of `arch`, and the seconds this process takes to open the
    dataset as a rank does and take its first batch (the start-up time that depends on the data)."""
    from seqpar.config import Config, DataConfig, ModelConfig, TrainerConfig
    from seqpar.data.loader import GlobalBatchLoader
    from seqpar.data.sequences import build_sequences

    cfg = Config(model=ModelConfig(arch=arch, vocab_size=4096, max_seq_len=512),
                 data=DataConfig(source="prepared", path=str(data)), trainer=TrainerConfig())
    start = time.perf_counter()
    seqs = build_sequences(cfg)
    next(GlobalBatchLoader(seqs.train, cfg.trainer.global_batch_size, seed=cfg.trainer.seed))
    return {"windows": len(seqs.train), "open_first_batch_s": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------------- loading


def loading(data: Path, batch: int, batches: int, steps: int, threads: int) -> dict:
    """Seconds per `next(loader)` of gpt2_small-shaped batches (1024 tokens) read from `data`, against the seconds
    of a gpt2_small training step on such a batch."""
    import torch

    from seqpar.cli import compose
    from seqpar.configs import CONFIG_DIR
    from seqpar.data.build import build_data
    from seqpar.data.loader import GlobalBatchLoader

    sys.path.insert(0, str(REPO / "scripts" / "bench"))
    import throughput

    cfg = compose(CONFIG_DIR, ["model=gpt2_small", "data=prepared", f"data.path={data}", "data.seq_len=1024",
                               f"trainer.global_batch_size={batch}"])
    before = _status_kib(os.getpid(), ("RssAnon", "RssFile"))
    start = time.perf_counter()
    seqs = build_data(cfg)
    loader = GlobalBatchLoader(seqs.train, batch, seed=cfg.trainer.seed)
    first_batch = next(loader)
    first = time.perf_counter() - start
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        next(loader)
        times.append(time.perf_counter() - start)
    after = _status_kib(os.getpid(), ("RssAnon", "RssFile"))
    torch.set_num_threads(threads)
    _, step = throughput.ours(cfg, cfg.trainer)
    b = {k: first_batch[k] for k in ("input_ids", "labels")}
    step_times = []
    for i in range(steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        step(b)
        if i:
            step_times.append(time.perf_counter() - start)
    load, step_s = statistics.median(times), statistics.median(step_times)
    return {"batch": batch, "seq_len": 1024, "windows": len(seqs.train), "open_and_first_batch_s": first,
            "batch_s_median": load, "batch_s_max": max(times), "batches": batches, "step_s": step_s,
            "steps": steps, "threads": threads, "share_of_step": load / step_s,
            "rss_anon_growth_mib": (after["RssAnon"] - before["RssAnon"]) / 1024,
            "rss_file_growth_mib": (after["RssFile"] - before["RssFile"]) / 1024}


# ---------------------------------------------------------------------------------------------------- report


def plot(rows: list[dict], out: Path, baseline: list[dict] | None = None, baseline_label: str = "") -> None:
    """Peak memory per rank against corpus size; `baseline`: an earlier run's rows (--json), drawn faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted({r["size_mib"] for r in rows})
    for arch in MODELS:
        mine = sorted((r for r in rows if r["arch"] == arch), key=lambda r: r["size_mib"])
        if not mine:
            continue
        x = [r["size_mib"] for r in mine]
        line = ax.plot(x, [r["peak_mem_mib"] for r in mine], "o-", label=f"{MODELS[arch]}: peak_mem_mib (max rank)")[0]
        ax.plot(x, [r["rss_anon_mib"] for r in mine], "s:", color=line.get_color(),
                label=f"{MODELS[arch]}: peak RssAnon (largest rank)")
        earlier = sorted((r for r in baseline or [] if r["arch"] == arch), key=lambda r: r["size_mib"])
        if earlier:
            ax.plot([r["size_mib"] for r in earlier], [r["peak_mem_mib"] for r in earlier], "o--", alpha=0.4,
                    color=line.get_color(), label=f"{MODELS[arch]}: peak_mem_mib, {baseline_label}")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [f"{s / 1024:g} GiB" if s >= 1024 else f"{s:g} MiB" for s in sizes])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set(xlabel="corpus (text)", ylabel="MiB", title="peak resident memory per rank, sp=2, prepared data")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |", flush=True)
    print()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/databench", help="corpora, tokenizers, prepared data and runs go here")
    ap.add_argument("--sizes", type=float, nargs="+", default=[10, 100, 1024], help="corpus sizes, MiB of text")
    ap.add_argument("--archs", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--prepare-max-mib", type=float, default=None,
                    help="architectures other than gpt skip corpora above this size (time)")
    ap.add_argument("--reuse-prepared", action="store_true",
                    help="take the prepared data and its prepare's numbers from an earlier run in --work, if there")
    ap.add_argument("--num-proc", type=int, default=None, help="data.num_proc of the prepares (default: theirs)")
    ap.add_argument("--alternate-mib", type=float, default=32,
                    help="corpus of the prepare-against-encode_batch rounds (0: none)")
    ap.add_argument("--rounds", type=int, default=3, help="encode_batch / prepare rounds, back to back")
    ap.add_argument("--alternate-only", action="store_true", help="only the encode_batch / prepare rounds")
    ap.add_argument("--tokenizer-mib", type=float, default=10, help="text the tokenizers are trained on")
    ap.add_argument("--sample-mib", type=float, default=32, help="text of the tokenizers' own throughput test")
    ap.add_argument("--steps", type=int, default=4, help="training steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="training runs per corpus and model")
    ap.add_argument("--load-batch", type=int, default=1, help="gpt2_small sequences of 1024 tokens per batch")
    ap.add_argument("--load-batches", type=int, default=200)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the gpt2_small step")
    ap.add_argument("--skip-loading", action="store_true", help="leave out the gpt2_small batch-loading test")
    ap.add_argument("--plot", help="write the plot of peak memory per rank against corpus size here (PNG)")
    ap.add_argument("--json", help="also write every number here")
    ap.add_argument("--baseline", nargs=2, metavar=("JSON", "LABEL"),
                    help="an earlier run's --json, drawn faint in the plot with this label (e.g. the code before a fix)")
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sizes = sorted(args.sizes)
    label = {s: (f"{s / 1024:g} GiB" if s >= 1024 else f"{s:g} MiB") for s in sizes}
    result: dict = {"sizes_mib": sizes, "argv": sys.argv[1:], "prepare": [], "train": []}

    corpora = {s: build_corpus(work / f"corpus-{s:g}", s) for s in sizes}
    tokenizers = train_tokenizers(corpora[sizes[0]], work, args.tokenizer_mib)
    if args.alternate_mib:
        small = build_corpus(work / f"corpus-{args.alternate_mib:g}", args.alternate_mib)
        result["alternated"] = [alternated(small, arch, tokenizers[arch], work, args.rounds, args.num_proc)
                                for arch in args.archs]
        table(["tokenizer", "corpus", "round", "encode_batch MiB/s", "encode_batch_fast MiB/s",
               "prepare MiB/s (its line; wall)", "prepare / encode_batch", "prepare peak Pss MiB"],
              [[a["arch"], f"{a['corpus_mib']:.0f} MiB", i + 1, f"{r['encode_batch']:.2f}", f"{r['encode_batch_fast']:.2f}",
                f"{r['prepare']:.2f}; {r['prepare_wall']:.2f}", f"{r['ratio']:.0%}", f"{r['tree_pss_mib']:.0f}"]
               for a in result["alternated"] for i, r in enumerate(a["rounds"])])
        if args.alternate_only:
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
            return
    result["tokenizers"] = [{arch: tokenizers_rate(corpora[sizes[-1]], tokenizers[arch], args.sample_mib)
                             for arch in args.archs}]

    prepared = {}
    for arch in args.archs:
        for s in sizes:
            if arch != "gpt" and args.prepare_max_mib is not None and s > args.prepare_max_mib:
                continue
            out = work / f"prepared-{arch}-{s:g}"
            row = {"size_mib": s, **prepare(corpora[s], arch, tokenizers[arch], out, work, args.num_proc,
                                            args.reuse_prepared)}
            earlier = " (an earlier run)" if row.get("reused") else ""
            print(f"prepared {arch} {label[s]}{earlier}: {row['seconds']:.1f} s, {row['mib_per_s']:.2f} MiB/s, "
                  f"tree Pss peak {row['tree_pss_mib']:.0f} MiB", flush=True)
            result["prepare"].append(row)
            prepared[arch, s] = out
    # The tokenizers' own rate before and after the prepares (the machine is shared): their mean is the reference.
    if result["prepare"] and not all(r.get("reused") for r in result["prepare"]):
        result["tokenizers"].append({arch: tokenizers_rate(corpora[sizes[-1]], tokenizers[arch], args.sample_mib)
                                     for arch in args.archs})
    print()
    table(["tokenizer", "when", "sample", "encode_batch MiB/s", "encode_batch_fast MiB/s"],
          [[arch, when, f"{r['sample_mib']:.1f} MiB, {r['documents']:,} documents",
            f"{r['encode_batch']['mib_per_s']:.2f}", f"{r['encode_batch_fast']['mib_per_s']:.2f}"]
           for when, rates in zip(("before the prepares", "after the prepares"), result["tokenizers"], strict=False)
           for arch, r in rates.items()])
    enc = {arch: statistics.mean(rates[arch]["encode_batch"]["mib_per_s"] for rates in result["tokenizers"])
           for arch in args.archs}
    table(["arch", "corpus", "documents", "tokens", "shards", "wall s", "MiB/s (wall)", "MiB/s (prepare's line)",
           "of its tokenizer's encode_batch", "largest process peak RSS MiB", "all processes peak Pss MiB"],
          [[r["arch"], label[r["size_mib"]], f"{r['documents']:,}", f"{r['tokens']:,}", r["shards"], f"{r['seconds']:.1f}",
            f"{r['mib_per_s']:.2f}", f"{r['own_mib_per_s']:.2f}", f"{r['mib_per_s'] / enc[r['arch']]:.0%}",
            f"{r['maxrss_mib']:.0f}", f"{r['tree_pss_mib']:.0f}"]
           for r in result["prepare"]])

    # Repeats outermost: a change in the machine's load during the runs falls on every corpus alike.
    runs = {key: [] for key in prepared}
    for _ in range(args.repeats):
        for (arch, s), data in prepared.items():
            runs[arch, s].append(train(arch, data, work / f"run-{arch}-{s:g}", work, args.steps))
            print(f"trained {MODELS[arch]} on {label[s]}: first step {runs[arch, s][-1]['first_step_s']:.2f} s, "
                  f"peak {runs[arch, s][-1]['peak_mem_mib']:.0f} MiB", flush=True)
    summary = []
    for arch, s in list(prepared)[:1]:
        open_data(prepared[arch, s], arch)  # the first opening in this process pays one-time imports: not timed
    for (arch, s), data in prepared.items():
        mine = runs[arch, s]
        row = {"arch": arch, "size_mib": s, "corpus_mib": corpus_bytes(corpora[s]) / MIB, **open_data(data, arch),
               "runs": mine}
        for k in ("first_step_s", "peak_mem_mib", "rss_anon_mib", "rss_file_mib"):
            row[k] = statistics.median(r[k] for r in mine)
        row["first_step_range"] = [min(r["first_step_s"] for r in mine), max(r["first_step_s"] for r in mine)]
        row["same_losses"] = all(r["losses"] == mine[0]["losses"] for r in mine)
        summary.append(row)
    result["train"] = summary
    print()
    table(["model", "corpus", "training windows", "start to first step s (median, range)", "open + first batch s",
           "peak_mem_mib per rank, first run (max of ranks, median)", "peak RssAnon MiB", "peak RssFile MiB", "losses equal across runs"],
          [[MODELS[r["arch"]], label[r["size_mib"]], f"{r['windows']:,}",
            f"{r['first_step_s']:.2f} ({r['first_step_range'][0]:.2f}-{r['first_step_range'][1]:.2f})",
            f"{r['open_first_batch_s']:.3f}",
            " / ".join(f"{m:.0f}" for m in r["runs"][0]["peak_mem_mib_per_rank"]) + f" ({r['peak_mem_mib']:.0f})",
            f"{r['rss_anon_mib']:.0f}", f"{r['rss_file_mib']:.0f}", "yes" if r["same_losses"] else "no"]
           for r in summary])
    growth = []
    for arch in MODELS:
        mine = sorted((r for r in summary if r["arch"] == arch), key=lambda r: r["size_mib"])
        if len(mine) > 1:
            a, b = mine[0], mine[-1]
            growth.append([MODELS[arch], f"{label[a['size_mib']]} -> {label[b['size_mib']]}",
                           f"{b['peak_mem_mib'] - a['peak_mem_mib']:+.0f}", f"{b['rss_anon_mib'] - a['rss_anon_mib']:+.0f}",
                           f"{b['rss_file_mib'] - a['rss_file_mib']:+.0f}", f"{b['first_step_s'] - a['first_step_s']:+.2f}",
                           f"{b['open_first_batch_s'] - a['open_first_batch_s']:+.3f}"])
    if growth:
        table(["model", "corpus", "peak_mem_mib growth per rank", "RssAnon growth", "RssFile growth",
               "start-up difference s (median)", "open + first batch difference s"], growth)

    if not args.skip_loading and ("gpt", sizes[-1]) in prepared:
        load = loading(prepared["gpt", sizes[-1]], args.load_batch, args.load_batches, 2, args.threads)
        result["loading"] = load
        table(["data", "batch", "open + first batch s", "next(loader) ms (median / max)", "gpt2_small step s",
               "loading / step", "RssAnon / RssFile growth MiB"],
              [[f"gpt, {label[sizes[-1]]}, {load['windows']:,} windows", f"{load['batch']} x 1024",
                f"{load['open_and_first_batch_s']:.2f}",
                f"{load['batch_s_median'] * 1e3:.3f} / {load['batch_s_max'] * 1e3:.3f}", f"{load['step_s']:.2f}",
                f"{load['share_of_step']:.4%}",
                f"{load['rss_anon_growth_mib']:+.1f} / {load['rss_file_growth_mib']:+.1f}"]])
    if args.plot:
        baseline = json.loads(Path(args.baseline[0]).read_text())["train"] if args.baseline else None
        plot(summary, Path(args.plot), baseline, args.baseline[1] if args.baseline else "")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
