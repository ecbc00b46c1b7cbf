"""Why `serve` runs its slots one at a time: two decodes at once against one after the other.

Each worker process loads the model (tri, budget 256), reads the same 512-token prompt, then
greedily decodes --tokens tokens with --threads threads. Run alone:

    python scripts/concurrent_decode.py MODEL [--tokens 128] [--threads 2]
"""
import argparse
import multiprocessing as mp
import time


def worker(model: str, tokens: int, threads: int, start, out) -> None:
    from triattention_gguf import Llama
    from triattention_gguf.calibrate import default_text

    llm = Llama(model, kv_compress="tri", kv_budget=256, kv_divide_length=64, n_ctx=4096, n_threads=threads,
                verbose=False)
    prompt = llm.tokenize(default_text()[:4000].encode())[:512]
    llm.eval(prompt)
    start.wait()
    t = time.perf_counter()
    generator = llm.generate(prompt, temp=0.0)
    for _ in range(tokens):
        next(generator)
    out.put(time.perf_counter() - t)


def run(model: str, tokens: int, threads: int, n: int, together: bool) -> list[float]:
    out = mp.Queue()
    seconds = []
    batches = [range(n)] if together else [[i] for i in range(n)]
    for batch in batches:
        start = mp.Barrier(len(batch))
        procs = [mp.Process(target=worker, args=(model, tokens, threads, start, out)) for _ in batch]
        for p in procs:
            p.start()
        seconds += [out.get() for _ in procs]
        for p in procs:
            p.join()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    one = run(args.model, args.tokens, args.threads, 2, together=False)
    both = run(args.model, args.tokens, args.threads, 2, together=True)
    print(f"one after the other: {2 * args.tokens / sum(one):.1f} tokens/s in all "
          f"({', '.join(f'{s:.2f}' for s in one)} s each)")
    print(f"two at once:         {2 * args.tokens / max(both):.1f} tokens/s in all "
          f"({', '.join(f'{s:.2f}' for s in both)} s each)")


if __name__ == "__main__":
    main()
