/**
 * `deno task load`, and the load generator of `deno task bench`: closed-loop
 * round trips on many connections, every echoed byte checked, with throughput,
 * latency percentiles and Jain's fairness index.
 *
 * ```sh
 * deno task load --duration 5 --count 100
 * ```
 *
 * @module
 */

import {
  type Flags,
  type LatencyFigures,
  latencyFigures,
  parseCommandLine,
  refusedMessage,
  withDefaults,
} from "../cli.ts";

/** Options for {@linkcode runLoad}. */
export interface LoadOptions {
  /** The server's address. @default {"127.0.0.1"} */
  hostname?: string;
  /** The server's port. @default {8888} */
  port?: number;
  /** Connect to this Unix socket instead of hostname and port. */
  unixPath?: string;
  /** Connections, each doing round trips one after another. @default {20} */
  count?: number;
  /** Bytes per message. @default {5} */
  size?: number;
  /** Seconds to run. @default {5} */
  duration?: number;
  /** Milliseconds a round trip may take before it counts as an error. @default {10000} */
  timeout?: number;
  /** Called about four times a second with the round trips done so far. */
  onProgress?: (roundTrips: number) => void;
}

/** What a load run measured. */
export interface LoadResult {
  /** Round trips completed and verified. */
  roundTrips: number;
  /** Round trips per second. */
  perSecond: number;
  /** Round-trip latency in milliseconds: min, p50, p99, p999, max. */
  ms: LatencyFigures;
  /** Jain's fairness index over the connections' round trips: 1 = all served equally. */
  jain: number;
  /** The least-served connection's round trips relative to the mean: 0 = one starved. */
  worst: number;
  /** Connections that failed (refused, reset, wrong bytes, timed out). */
  failed: number;
  /** Why the first failed connection failed. */
  firstError?: string;
}

/** What {@linkcode runLoad} does when an option is not given; the flags share them. */
const DEFAULTS: Required<Omit<LoadOptions, "onProgress">> = {
  hostname: "127.0.0.1",
  port: 8888,
  unixPath: "",
  count: 20,
  size: 5,
  duration: 5,
  timeout: 10_000,
};

/**
 * Closed-loop load: `count` connections each send a message, wait for its whole
 * echo, check every byte, and go again, for `duration` seconds. Each connection
 * sends its own byte stream, so lost, doubled or crossed bytes are caught.
 *
 * @param options Where to connect and how hard.
 * @returns Throughput, latency percentiles and failures.
 */
export async function runLoad(options: LoadOptions = {}): Promise<LoadResult> {
  const { hostname, port, unixPath, count, size, duration, timeout } = withDefaults(
    options as Omit<LoadOptions, "onProgress">,
    DEFAULTS,
  );
  const latencies: number[] = [];
  const perConnection = new Array<number>(count).fill(0);
  const errors: string[] = [];
  const conns: (Deno.Conn | undefined)[] = [];
  const stalled = new Set<number>(); // connections the watchdog closed: their error is counted
  const progress: number[] = []; // performance.now() of each connection's last step
  const start = performance.now();
  const end = start + duration * 1000;
  // One watchdog for all connections: a stalled one is closed, which ends its read.
  const { onProgress } = options;
  const ticker = onProgress && setInterval(() => onProgress(latencies.length), 250);
  const watchdog = setInterval(() => {
    const now = performance.now();
    progress.forEach((last, c) => {
      if (now - last > timeout && conns[c]) {
        stalled.add(c);
        errors.push(`no echo within ${timeout} ms`);
        conns[c]!.close();
        conns[c] = undefined;
      }
    });
  }, Math.min(timeout, 500));
  await Promise.all(Array.from({ length: count }, async (_, c) => {
    progress[c] = performance.now();
    try {
      const signal = AbortSignal.timeout(timeout); // a connect gets as long as a round trip
      const conn: Deno.Conn = conns[c] = unixPath
        ? await Deno.connect({ transport: "unix", path: unixPath })
        : await Deno.connect({ hostname, port, signal });
      if ("setNoDelay" in conn) (conn as Deno.TcpConn).setNoDelay(true);
      const sent = new Uint8Array(size);
      const echoed = new Uint8Array(size);
      for (let offset = 0; performance.now() < end; offset += size) {
        for (let i = 0; i < size; i++) sent[i] = streamByte(c, offset + i);
        const begin = progress[c] = performance.now();
        for (let done = 0; done < size;) done += await conn.write(sent.subarray(done));
        for (let got = 0; got < size;) {
          const n = await conn.read(echoed.subarray(got));
          if (n === null) throw new Error(`connection closed at byte ${offset + got}`);
          got += n;
        }
        latencies.push((progress[c] = performance.now()) - begin);
        perConnection[c]++;
        const at = echoed.findIndex((byte, i) => byte !== sent[i]);
        if (at >= 0) throw new Error(`wrong byte at ${offset + at}`);
      }
    } catch (error) {
      if (!stalled.has(c)) {
        errors.push(error instanceof Error ? `${error.name}: ${error.message}` : String(error));
      }
    } finally {
      conns[c]?.close();
      conns[c] = undefined;
    }
  }));
  clearInterval(watchdog);
  clearInterval(ticker);
  const seconds = (performance.now() - start) / 1000;
  return {
    roundTrips: latencies.length,
    perSecond: latencies.length / seconds,
    ms: latencyFigures(latencies),
    jain: jainIndex(perConnection),
    worst: Math.min(...perConnection) / (latencies.length / count || 1),
    failed: errors.length,
    ...(errors.length ? { firstError: errors[0] } : {}),
  };
}

/** Jain's fairness index of shares: (Σx)² / (n·Σx²), 1 when all are equal. */
function jainIndex(shares: number[]): number {
  const sum = shares.reduce((a, b) => a + b, 0);
  const squares = shares.reduce((a, b) => a + b * b, 0);
  return squares ? (sum * sum) / (shares.length * squares) : 0;
}

/** Byte `offset` of connection `c`'s stream: varies with both, so a misplaced byte shows. */
function streamByte(c: number, offset: number): number {
  return (offset * 31 + c * 17 + (offset >>> 8)) & 0xff;
}

const USAGE =
  `usage: deno task load [--duration S] [--host H] [--port N | --unix PATH] [--count N] [--size N] [--timeout MS] [--json]`;

const HELP = `Load: each connection sends a message, waits for its whole echo, checks
every byte against its own byte stream, and goes again, for S seconds; then
prints round trips per second, latency percentiles and Jain's fairness index.

${USAGE}

  --duration S     seconds to run (default ${DEFAULTS.duration})
  --host H         server address (default ${DEFAULTS.hostname})
  --port N         server port (default ${DEFAULTS.port})
  --unix PATH      connect to a Unix socket instead
  --count N        concurrent connections (default ${DEFAULTS.count})
  --size N         bytes per message, up to 1048576 (default ${DEFAULTS.size})
  --timeout MS     milliseconds a round trip may take (default ${DEFAULTS.timeout})
  --json           print the figures as one JSON document
  --help           show this help

Exit status: 0 if every round trip was exact, 1 if not, 2 on bad usage.`;

const FLAGS = {
  duration: { type: "number", min: 0.1 },
  host: { type: "text" },
  port: { type: "integer", min: 1, max: 65535 },
  unix: { type: "text" },
  count: { type: "integer", min: 1, max: 100_000 },
  size: { type: "integer", min: 1, max: 1 << 20 }, // written whole before reading: within socket buffers
  timeout: { type: "integer", min: 1 },
  json: { type: "boolean" },
} as const;

function optionsFrom(flags: Flags<typeof FLAGS>): LoadOptions & { json?: boolean } {
  return {
    json: flags.json,
    hostname: flags.host,
    port: flags.port,
    unixPath: flags.unix,
    count: flags.count,
    size: flags.size,
    duration: flags.duration,
    timeout: flags.timeout,
  };
}

/**
 * Runs the load from the command line: two lines of figures.
 *
 * @param args The command-line arguments.
 * @returns The exit code: 0 if every round trip was exact, 1 if not, 2 on bad usage.
 */
export async function main(args: string[]): Promise<number> {
  const parsed = parseCommandLine(
    args,
    FLAGS,
    { name: "load.ts", help: HELP },
    optionsFrom,
  );
  if ("exit" in parsed) return parsed.exit;
  const { json, ...given } = parsed.options;
  const options = withDefaults(given, DEFAULTS);
  const { count, size, duration } = options;
  const progress = progressLine(duration);
  const result = await runLoad({ ...options, onProgress: progress?.show });
  progress?.clear();
  const refused = result.failed === count && /ConnectionRefused/.test(result.firstError ?? "");
  if (refused) console.error(refusedMessage("load.ts", options.hostname, options.port));
  if (json) {
    console.log(JSON.stringify(report(options, result), null, 2));
    return result.failed ? 1 : 0;
  }
  if (refused) return 1;
  const ms = (x: number) => x.toFixed(2);
  console.log(
    `${count} connections, ${size}-byte messages, ${duration} s: ${result.roundTrips} round trips verified, ${
      Math.round(result.perSecond)
    }/s`,
  );
  console.log(
    `latency ms: p50 ${ms(result.ms.p50)}, p99 ${ms(result.ms.p99)}, p99.9 ${
      ms(result.ms.p999)
    }; fairness (Jain) ${result.jain.toFixed(3)}`,
  );
  if (result.failed) {
    console.error(`${result.failed} connections failed; first: ${result.firstError}`);
  }
  return result.failed ? 1 : 0;
}

/** The version of `--json`'s shape, in the document: bumped when a field changes or goes away. */
export const LOAD_REPORT_SCHEMA = "echo-load/1";

/** The figures for `--json`: where, what load, and what it measured (`jq .summary`). */
function report(options: Required<Omit<LoadOptions, "onProgress">>, result: LoadResult) {
  const { hostname, port, unixPath, count, size, duration } = options;
  const { roundTrips, perSecond, ms, jain, worst, failed, firstError } = result;
  const round = (x: number, digits: number) => Number(x.toFixed(digits));
  return {
    schema: LOAD_REPORT_SCHEMA,
    server: unixPath ? { unix: unixPath } : { host: hostname, port, protocol: "tcp" },
    load: { connections: count, size, seconds: duration },
    summary: {
      roundTrips,
      perSecond: Math.round(perSecond),
      failed,
      ms: Object.fromEntries(Object.entries(ms).map(([name, value]) => [name, round(value, 3)])),
      jain: round(jain, 4),
      worst: round(worst, 4),
      ...(firstError ? { error: firstError } : {}),
    },
  };
}

/**
 * On a terminal, a live line on stderr (elapsed time, round trips so far) that
 * disappears at the end; nothing when stderr is not a terminal or NO_COLOR is set.
 */
function progressLine(duration: number) {
  if (!Deno.stderr.isTerminal() || Deno.noColor) return undefined;
  const start = performance.now();
  const encoder = new TextEncoder();
  const write = (text: string) => Deno.stderr.writeSync(encoder.encode(text));
  return {
    show(roundTrips: number) {
      const elapsed = Math.min(duration, (performance.now() - start) / 1000);
      write(`\r\x1b[K${elapsed.toFixed(1)} of ${duration} s, ${roundTrips} round trips`);
    },
    clear: () => write("\r\x1b[K"),
  };
}

if (import.meta.main) Deno.exit(await main(Deno.args));
