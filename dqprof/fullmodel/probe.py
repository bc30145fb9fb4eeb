"""Logits and module methods of one vLLM engine: ``python -m dqprof.fullmodel.probe CKPT QUANT
OUT.json`` (GPU; the plugin's GPU test compares bitsandbytes with dqprof_nf4 through it).

One engine per process (the test runs one process per quantization), built as ``model run``
builds it (torch.compile and CUDA graphs unless ``--eager``). A few fixed prompts are decoded
greedily for a few tokens with every token's raw logits returned (``logprobs=-1``,
``logprobs_mode="raw_logits"``): the first step is a prefill of all prompts together, the
later ones decode steps at M = number of prompts. Written out: the generated tokens, the
logits of every step, the quant method of every linear and embedding, and (dqprof_nf4) the
plugin's own list of what it quantized and left bf16.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

PROMPTS, PROMPT_LEN, STEPS = 4, 16, 4


def probe(ckpt: str, quant: str, eager: bool = False) -> dict[str, Any]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    from dqprof.fullmodel.worker import linear_methods, summarize_methods
    from dqprof.fullmodel.workload import make_prompts
    from dqprof.models.config import load_config

    if quant == "dqprof_nf4":
        from dqprof.fullmodel.plugin import register

        register()
    vocab = int(load_config(ckpt).get("vocab_size"))
    kw: dict[str, Any] = dict(model=ckpt, quantization=None if quant == "bf16" else quant,
                              dtype="bfloat16", skip_tokenizer_init=True, seed=0,
                              max_model_len=64, max_num_seqs=PROMPTS,
                              enable_prefix_caching=False, gpu_memory_utilization=0.4,
                              max_logprobs=-1, logprobs_mode="raw_logits")
    if eager:
        kw["enforce_eager"] = True
    else:
        kw["compilation_config"] = {"cudagraph_capture_sizes": [1, 2, PROMPTS]}
    llm = LLM(**kw)
    prompts = make_prompts(PROMPTS, PROMPT_LEN, vocab, 0, (7,))
    sp = SamplingParams(max_tokens=STEPS, temperature=0.0, logprobs=-1, ignore_eos=True,
                        detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    tokens, logits = [], []
    for o in outs:
        c = o.outputs[0]
        tokens.append(list(c.token_ids))
        steps = []
        for step in c.logprobs:
            row = [0.0] * vocab
            for tok, lp in step.items():
                row[tok] = float(lp.logprob)
            steps.append(row)
        logits.append(steps)
    out: dict[str, Any] = {"quant": quant, "tokens": tokens, "logits": logits,
                           "linear_methods": summarize_methods(
                               llm.apply_model(linear_methods)[0])}
    if quant == "dqprof_nf4":
        from dqprof.fullmodel.plugin import REPORT, summarize

        out["dqprof_nf4"] = {"quantized": summarize(list(REPORT["quantized"])),
                             "left_bf16": dict(REPORT["bf16"])}
    return out


def main(argv: list[str]) -> int:
    ckpt, quant, path = argv[:3]
    Path(path).write_text(json.dumps(probe(ckpt, quant, "--eager" in argv)))
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)  # vLLM's teardown can hang at exit; the file is written
