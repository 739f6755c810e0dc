/**
 * `deno task bench`: main.ts in both concurrent styles on both selectors
 * (epoll on Linux), against the idiomatic Deno echo server
 * (bench/baseline_echo.ts) and, where they are installed, the idiomatic Node
 * and Go ones and a C epoll one (bench/peers/), all driven by the
 * repository's native load generator (bench/loadgen, built here with Go),
 * scenario by scenario and server by server in turn, so that a noisy moment
 * hits all alike. Prints rates and the ratio to the baseline, latency
 * percentiles, fairness (Jain's index, the least-served connection,
 * timeouts), the server's CPU per operation, then the memory each idle
 * connection costs each server; and draws it all as docs/bench.svg.
 *
 * Usage: deno task bench [--duration S] [--runs N]
 *
 * @module
 */

import { parseCommandLine } from "../cli.ts";
import { processUsage } from "../testing/helpers.ts";
import { chart, type Row } from "./chart.ts";
import { unsupported } from "../libc.ts";
import { buildCPeer, buildNative, type LoadgenReport, runLoadgen } from "./native.ts";
import { type Command, mainTs, SpawnedServer } from "./spawn.ts";

/** A load to measure, in bench/loadgen's terms. */
interface Scenario {
  name: string;
  mode: "rr" | "bulk" | "churn";
  conns: number;
  size: number;
}

const SCENARIOS: Scenario[] = [
  { name: "rr 5 B x1", mode: "rr", conns: 1, size: 5 },
  { name: "rr 5 B x20", mode: "rr", conns: 20, size: 5 },
  { name: "rr 5 B x1000", mode: "rr", conns: 1000, size: 5 },
  { name: "rr 4 KiB x20", mode: "rr", conns: 20, size: 4096 },
  { name: "bulk x4", mode: "bulk", conns: 4, size: 65536 },
  { name: "churn x20", mode: "churn", conns: 20, size: 5 },
];
const IDLE_CONNECTIONS = 1000;
/** Where the chart goes; docs/performance.md shows it. */
const CHART = new URL("../docs/bench.svg", import.meta.url).pathname;
const root = new URL("../", import.meta.url).pathname;

/** A server to measure: its name in the tables, and the command that starts it on a port. */
interface Contender {
  name: string;
  command: Command;
}

/** The contenders that run here: Deno's always, epoll on Linux, Node, Go and C if installed. */
function contenders(
  peers: { node: boolean; go: string | undefined; c: string | undefined },
): Contender[] {
  const main = (name: string, ...flags: string[]): Contender => ({
    name,
    command: mainTs(...flags),
  });
  const epoll = unsupported() === undefined;
  return [
    {
      name: "idiomatic Deno",
      command: (port) =>
        [
          ...["deno", "run", "--allow-net=127.0.0.1", `${root}bench/baseline_echo.ts`, `${port}`],
        ] as [string, ...string[]],
    },
    main("callbacks"),
    main("async", "--style", "async"),
    ...(epoll
      ? [
        main("epoll", "--selector", "epoll"),
        main("epoll async", "--selector", "epoll", "--style", "async"),
      ]
      : []),
    ...(peers.node
      ? [{
        name: "Node",
        command: (port: number) =>
          ["node", `${root}bench/peers/node_echo.mjs`, `${port}`] as [string, ...string[]],
      }]
      : []),
    ...(peers.go
      ? [{ name: "Go", command: (port: number) => [peers.go!, `${port}`] }]
      : []) as Contender[],
    ...(peers.c
      ? [{ name: "C epoll", command: (port: number) => [peers.c!, `${port}`] }]
      : []) as Contender[],
  ];
}

/** Resident memory per idle connection: RSS with N connections open, minus before. */
async function idleKiB(server: SpawnedServer): Promise<number> {
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

/** A rate for the table: 64.3k, or MB/s in bulk. */
function rate(report: LoadgenReport): string {
  const { perSecond, unit } = report.summary;
  return unit === "bytes" ? `${(perSecond / 1e6).toFixed(0)} MB/s` : `${Math.round(perSecond)}`;
}

/**
 * The CPU the server spent per operation: a rate depends on the load
 * generator and the machine as much as on the server; this is the server's own cost.
 */
function cpuPerOp({ summary }: LoadgenReport): string {
  const { serverCpuSeconds = 0, ops, unit } = summary;
  if (!ops) return "";
  return unit === "bytes"
    ? (serverCpuSeconds * 1e3 / (ops / 1e6)).toFixed(2) // ms per MB
    : (serverCpuSeconds * 1e6 / ops).toFixed(1); // µs per round trip or connection
}

/** The scenario's figures of one server, for the table: timeouts and failures stand out. */
function fairness({ summary }: LoadgenReport): string {
  const lost = summary.failed ? `, ${summary.failed} failed (${summary.timeouts} timed out)` : "";
  return `${summary.jain.toFixed(3)} / ${summary.worst.toFixed(2)}${lost}`;
}

async function main(args: string[]): Promise<number> {
  const parsed = parseCommandLine(args, {
    duration: { type: "number", min: 0.5 },
    runs: { type: "integer", min: 1, max: 20 },
  }, {
    name: "bench.ts",
    help: `usage: deno task bench [--duration S] [--runs N]

Compares main.ts with the idiomatic Deno, Node and Go echo servers and a C
epoll one (built with cc, if there is one), through bench/loadgen (built with
Go: apt install golang-go, or https://go.dev/dl).

  --duration S   seconds per scenario and server (default 3)
  --runs N       runs per scenario, medians reported (default 1)`,
  }, (flags) => ({ duration: flags.duration ?? 3, runs: flags.runs ?? 1 }));
  if ("exit" in parsed) return parsed.exit;
  const { duration, runs } = parsed.options;
  const native = await buildNative();
  if ("missing" in native) {
    console.error(`bench.ts: ${native.missing}`);
    return 1;
  }
  const node = await new Deno.Command("node", { args: ["--version"], stdout: "null" }).output()
    .then((status) => status.success, () => false);
  const servers = contenders({ node, go: native.goEcho, c: await buildCPeer() })
    .map((contender) => new SpawnedServer(contender.name, contender.command));
  try {
    await Promise.all(servers.map((server) => server.ready()));
    // Memory first, while the processes are fresh: load grows heaps that stay grown.
    const idle: number[] = [];
    for (const server of servers) idle.push(await idleKiB(server));
    console.log(
      `Deno ${Deno.version.deno}, ${navigator.hardwareConcurrency} cpus; bench/loadgen, ${duration} s per scenario, median of ${runs} run(s); latency in ms\n`,
    );
    const names = servers.map((server) => server.name);
    console.log(row(["scenario", ...names]));
    console.log(row(Array(names.length + 1).fill("---")));
    let failed = 0;
    const rows: Row[] = [];
    const details: string[] = [];
    const cpu: string[] = [];
    for (const scenario of SCENARIOS) {
      const results: LoadgenReport[][] = servers.map(() => []);
      for (let run = 0; run < runs; run++) {
        // Rotate who goes first, so that a slow spell hits all alike.
        for (let k = 0; k < servers.length; k++) {
          const i = (run + k) % servers.length;
          const { mode, conns, size } = scenario;
          const load = {
            port: servers[i].port,
            mode,
            conns,
            size,
            duration,
            serverPid: servers[i].pid,
          };
          results[i].push(await runLoadgen(native.loadgen, load));
        }
      }
      const medians = results.map((list) =>
        list.sort((a, b) => a.summary.perSecond - b.summary.perSecond)[list.length >> 1]
      );
      for (const [i, { summary }] of medians.entries()) {
        if (summary.failed) {
          failed++;
          console.error(
            `${
              servers[i].name
            }, ${scenario.name}: ${summary.failed} connections failed (${summary.timeouts} timed out): ${summary.error}`,
          );
        }
      }
      const base = medians[0].summary.perSecond;
      rows.push({
        scenario: scenario.name,
        bars: medians.map(({ summary }) => ({
          perSecond: summary.perSecond,
          p99: summary.ms.p99 ?? NaN,
          jain: summary.jain,
        })),
      });
      console.log(row([
        scenario.name,
        ...medians.map((report, i) =>
          `${rate(report)}${i ? ` (${(report.summary.perSecond / base).toFixed(2)}x)` : ""}`
        ),
      ]));
      details.push(
        row([
          scenario.name,
          ...medians.map((report) => {
            const { p50, p99, p999 } = report.summary.ms;
            const latency = p50 === undefined ? "" : `${p50} / ${p99} / ${p999}; `;
            return `${latency}${fairness(report)}`;
          }),
        ]),
      );
      cpu.push(row([scenario.name, ...medians.map(cpuPerOp)]));
    }
    console.log(
      `\nLatency p50 / p99 / p99.9 (ms); Jain's index / least-served connection's share of the mean\n`,
    );
    console.log(row(["scenario", ...names]));
    console.log(row(Array(names.length + 1).fill("---")));
    for (const line of details) console.log(line);
    console.log(
      `\nServer CPU (user and system) per round trip or connection (µs), or per MB in bulk (ms)\n`,
    );
    console.log(row(["scenario", ...names]));
    console.log(row(Array(names.length + 1).fill("---")));
    for (const line of cpu) console.log(line);
    console.log(
      `\nMemory per idle connection (${IDLE_CONNECTIONS} open): ${
        servers.map((server, i) => `${server.name} ${idle[i].toFixed(1)} KiB`).join(", ")
      }`,
    );
    const title = `deno task bench: Deno ${Deno.version.deno}, ${navigator.hardwareConcurrency} ` +
      `cpus, bench/loadgen, ${duration} s per scenario, median of ${runs}`;
    await Deno.writeTextFile(CHART, chart(names, rows, title));
    console.log(`Chart: ${CHART}`);
    return failed ? 1 : 0;
  } finally {
    for (const server of servers) await server.stop();
  }
}

Deno.exit(await main(Deno.args));
