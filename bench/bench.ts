/**
 * `deno task bench`: main.ts, in both styles and on both selectors (epoll on
 * Linux), against the idiomatic Deno echo server (bench/baseline_echo.ts),
 * driven by bench/load.ts in the same run,
 * scenario by scenario, so that a noisy moment hits both. Prints a table of
 * round trips per second, latency percentiles, fairness, the ratio to the
 * baseline, and the memory each idle connection costs each server; and draws
 * round trips per second and p99 latency as docs/bench.svg.
 *
 * Usage: deno task bench [--duration S] [--runs N]
 *
 * @module
 */

import { type LoadResult, runLoad } from "./load.ts";
import { parseCommandLine } from "../cli.ts";
import { processUsage } from "../testing/helpers.ts";
import { chart, type Row } from "./chart.ts";
import { unsupported } from "../libc.ts";

/** Whether the epoll selector runs here (Linux); its servers get `--allow-ffi` on top. */
const epoll = unsupported() === undefined;
const FFI = ["--allow-net=127.0.0.1", "--allow-ffi"];

/** A load to measure: `count` connections sending `size`-byte messages. */
interface Scenario {
  name: string;
  count: number;
  size: number;
}

const SCENARIOS: Scenario[] = [
  { name: "rr 5 B x1", count: 1, size: 5 },
  { name: "rr 5 B x20", count: 20, size: 5 },
  { name: "rr 5 B x500", count: 500, size: 5 },
  { name: "rr 4 KiB x20", count: 20, size: 4096 },
  { name: "rr 256 KiB x4", count: 4, size: 256 * 1024 },
];
const IDLE_CONNECTIONS = 1000;
/** Where the chart goes; docs/performance.md shows it. */
const CHART = new URL("../docs/bench.svg", import.meta.url).pathname;

const root = new URL("../", import.meta.url).pathname;

/** A server process on a free port. */
class Server {
  readonly name: string;
  readonly port: number;
  readonly #child: Deno.ChildProcess;

  constructor(
    name: string,
    script: string,
    args: string[],
    permissions = ["--allow-net=127.0.0.1"],
  ) {
    this.name = name;
    const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    this.port = probe.addr.port;
    probe.close();
    this.#child = new Deno.Command("deno", {
      args: ["run", ...permissions, `${root}${script}`, ...args, `${this.port}`],
      stdin: "null",
      stdout: "null",
    }).spawn();
  }

  get pid(): number {
    return this.#child.pid;
  }

  /** Waits until the server accepts connections. */
  async ready(): Promise<void> {
    for (let i = 0; i < 200; i++) {
      try {
        (await Deno.connect({ hostname: "127.0.0.1", port: this.port })).close();
        return;
      } catch {
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
    throw new Error(`${this.name} did not start`);
  }

  async stop(): Promise<void> {
    this.#child.kill("SIGKILL");
    await this.#child.status;
  }
}

/** Resident memory per idle connection: RSS with N connections open, minus before. */
async function idleKiB(server: Server): Promise<number> {
  const before = await processUsage(server.pid);
  const conns = await Promise.all(
    Array.from(
      { length: IDLE_CONNECTIONS },
      () => Deno.connect({ hostname: "127.0.0.1", port: server.port }),
    ),
  );
  await new Promise((resolve) => setTimeout(resolve, 500)); // let the server accept them all
  const after = await processUsage(server.pid);
  for (const conn of conns) conn.close();
  return (after.rssKiB - before.rssKiB) / IDLE_CONNECTIONS;
}

function row(cells: (string | number)[]): string {
  return `| ${cells.join(" | ")} |`;
}

const ms = (x: number) => x.toFixed(2);
const latency = (r: LoadResult) => `${ms(r.ms.p50)} / ${ms(r.ms.p99)} / ${ms(r.ms.p999)}`;

async function main(args: string[]): Promise<number> {
  const parsed = parseCommandLine(args, {
    duration: { type: "number", min: 0.5 },
    runs: { type: "integer", min: 1, max: 20 },
  }, {
    name: "bench.ts",
    help:
      "usage: deno task bench [--duration S] [--runs N]\n\nCompares main.ts, in both styles, with the idiomatic baseline.\n\n  --duration S   seconds per scenario and server (default 3)\n  --runs N       runs per scenario, medians reported (default 1)",
  }, (flags) => ({
    duration: flags.duration ?? 3,
    runs: flags.runs ?? 1,
  }));
  if ("exit" in parsed) return parsed.exit;
  const { duration, runs } = parsed.options;
  const servers = [
    new Server("baseline", "bench/baseline_echo.ts", []),
    new Server("callbacks", "main.ts", ["--quiet", "--port"]),
    new Server("async", "main.ts", ["--quiet", "--style", "async", "--port"]),
    ...(epoll
      ? [
        new Server("epoll", "main.ts", ["--quiet", "--selector", "epoll", "--port"], FFI),
        new Server("epoll async", "main.ts", [
          ...["--quiet", "--selector", "epoll", "--style", "async", "--port"],
        ], FFI),
      ]
      : []),
  ];
  try {
    await Promise.all(servers.map((server) => server.ready()));
    // Memory first, while the processes are fresh: load grows heaps that stay grown.
    const idle: number[] = [];
    for (const server of servers) idle.push(await idleKiB(server));
    console.log(
      `Deno ${Deno.version.deno}, ${navigator.hardwareConcurrency} cpus; ${duration} s per scenario, median of ${runs} run(s); latency in ms; main.ts in both styles against the baseline\n`,
    );
    const names = servers.map((server) => server.name);
    console.log(row([
      "scenario",
      ...names.map((name) => `${name} rt/s`),
      ...names.map((name) => `${name} p50 / p99 / p99.9`),
      `Jain ${names.join(" / ")}`,
    ]));
    console.log(row(Array(2 * names.length + 2).fill("---")));
    let failed = 0;
    const rows: Row[] = [];
    for (const scenario of SCENARIOS) {
      const results: LoadResult[][] = servers.map(() => []);
      for (let run = 0; run < runs; run++) {
        // Rotate who goes first, so that a slow spell hits all alike.
        for (let k = 0; k < servers.length; k++) {
          const i = (run + k) % servers.length;
          results[i].push(await runLoad({ port: servers[i].port, duration, ...scenario }));
        }
      }
      const medians = results.map((list) =>
        list.sort((a, b) => a.perSecond - b.perSecond)[list.length >> 1]
      );
      for (const [i, result] of medians.entries()) {
        if (result.failed) {
          failed++;
          console.error(
            `${
              servers[i].name
            }, ${scenario.name}: ${result.failed} connections failed: ${result.firstError}`,
          );
        }
      }
      const base = medians[0].perSecond;
      rows.push({
        scenario: scenario.name,
        bars: medians.map(({ perSecond, ms }) => ({ perSecond, p99: ms.p99 })),
      });
      console.log(row([
        scenario.name,
        ...medians.map((result, i) =>
          `${Math.round(result.perSecond)}${i ? ` (${(result.perSecond / base).toFixed(2)}x)` : ""}`
        ),
        ...medians.map(latency),
        medians.map((result) => result.jain.toFixed(2)).join(" / "),
      ]));
    }
    console.log(
      `\nMemory per idle connection (${IDLE_CONNECTIONS} open): ${
        servers.map((server, i) => `${server.name} ${idle[i].toFixed(1)} KiB`).join(", ")
      }`,
    );
    const title =
      `deno task bench: Deno ${Deno.version.deno}, ${navigator.hardwareConcurrency} cpus, ` +
      `${duration} s per scenario, median of ${runs}`;
    const legend = [
      "idiomatic Deno",
      "main.ts (callbacks)",
      "main.ts (async)",
      ...(epoll ? ["epoll (callbacks)", "epoll (async)"] : []),
    ];
    await Deno.writeTextFile(CHART, chart(legend, rows, title));
    console.log(`Chart: ${CHART}`);
    return failed ? 1 : 0;
  } finally {
    for (const server of servers) await server.stop();
  }
}

Deno.exit(await main(Deno.args));
