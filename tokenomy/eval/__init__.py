"""Batch evaluation: `tokenomy eval` and `tokenomy report`.

    tokenomy eval --model tiny-llava --reducer none,random,fastv --keep 192,64 --tasks pope,mme \\
        --data-dir D --batch_size 4 --output_path O --log_samples [--resume] [--on-error skip|fail]
    torchrun --nproc_per_node 4 -m tokenomy.cli eval ...          # data-parallel: ranks shard, rank 0 merges
    tokenomy report O                                             # markdown table + one PNG per task

Tasks (`--tasks list`) read local files under `D/<task folder>/` (or `D` itself) in the layout the benchmark is
distributed in, or as lmms-eval rows (*.parquet, *.jsonl, a `datasets` save_to_disk folder); a missing file is
an error that says what was expected where (synthvqa is generated in memory and needs no `--data-dir`). Scoring
follows the reference evaluators (ecosystem spec §2): VQA soft accuracy with EvalAI normalisation, GQA exact
match, POPE with LLaVA parsing, MME acc + acc+, ScienceQA letter rules, MMBench CircularEval with static
extraction, SEED first letter, Video-MME letter regex.

Outputs under `O/<model>/`: `<stamp>_results.json` (per task, reducer and keep: metrics, an efficiency block, sample
counts, errors) rewritten after every combination, and with --log_samples `<stamp>_samples_<task>.jsonl`, one
line per sample. `--resume` continues the newest unfinished run started with the same arguments (`--on-error` may
differ), `--resume RUN_ID` that run; finished chunks of samples are never re-run and never counted twice, even
after SIGKILL. A run that fails before its first sample (model, data, options) leaves no unfinished run behind.
Every option is checked before data is read or the model is built.

Bad samples: rows unusable at load (malformed line, missing image file, null question, empty answers, duplicate
id) and any failure of one sample at run time, whatever raised it (undecodable or oversized image, a prompt the
model refuses, a scoring error). With `--on-error skip` (default) each is reported on stderr and listed in the
results under `errors` with its id and reason, and everything else is evaluated; with `fail` the run stops at the
first one, naming its id (the finished samples stay on disk for `--resume`, which may switch to `skip`).
`n-samples`: selected = scored + skipped; rows unusable at load are counted whatever `--limit` says.

Efficiency block: visual tokens in and kept, layer-averaged retention, prefill FLOPs (FastV convention, the
formula is written into the results), prefill ms and decode ms per token (per batch, warm-up excluded;
CUDA-synchronised on GPU, perf_counter on CPU), end-to-end ms, peak memory (CUDA max allocated, or process peak
RSS on CPU).
"""
