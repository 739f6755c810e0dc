/**
 * The repository's native tools, built into bench/.bin/: with Go, bench/loadgen,
 * the load generator the figures in docs/ come from, and bench/peers/go_echo.go,
 * the idiomatic Go server `deno task bench` measures against; with a C
 * compiler, bench/peers/c_echo.c, the epoll selector's loop without a runtime.
 * Go builds them in a second or two once its cache is warm.
 *
 * @module
 */

const bin = new URL("./.bin/", import.meta.url).pathname;

/** Where the built tools are. */
export interface NativeTools {
  /** bench/loadgen. */
  loadgen: string;
  /** bench/peers/go_echo.go. */
  goEcho: string;
}

/**
 * Builds the tools (Go skips what is up to date).
 *
 * @returns Their paths, or, without Go, one line saying how to get it.
 */
export async function buildNative(): Promise<NativeTools | { missing: string }> {
  const tools = { loadgen: `${bin}loadgen`, goEcho: `${bin}go_echo` };
  const sources = { loadgen: "loadgen/loadgen.go", goEcho: "peers/go_echo.go" };
  for (const name of ["loadgen", "goEcho"] as const) {
    const source = new URL(sources[name], import.meta.url).pathname;
    let built: Deno.CommandOutput;
    try {
      built = await new Deno.Command("go", { args: ["build", "-o", tools[name], source] }).output();
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
      return {
        missing:
          "the load generator is built with Go, which is not installed: apt install golang-go (or https://go.dev/dl)",
      };
    }
    if (!built.success) {
      throw new Error(`go build ${source} failed:\n${new TextDecoder().decode(built.stderr)}`);
    }
  }
  return tools;
}

/**
 * Builds bench/peers/c_echo.c with `cc`.
 *
 * @returns Its path, or undefined without a C compiler.
 */
export async function buildCPeer(): Promise<string | undefined> {
  const [source, built] = [new URL("peers/c_echo.c", import.meta.url).pathname, `${bin}c_echo`];
  let output: Deno.CommandOutput;
  try {
    output = await new Deno.Command("cc", { args: ["-O2", "-o", built, source] }).output();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw error;
  }
  if (!output.success) {
    throw new Error(`cc ${source} failed:\n${new TextDecoder().decode(output.stderr)}`);
  }
  return built;
}

/** A load for bench/loadgen: its flags. */
export interface LoadgenOptions {
  /** The server's port on 127.0.0.1. */
  port: number;
  /** hello (the lesson's client: one round trip per connection), rr, bulk, churn or idle. */
  mode: "hello" | "rr" | "bulk" | "churn" | "idle";
  /** Connections (workers in churn mode). */
  conns: number;
  /** Message size in bytes. */
  size: number;
  /** Seconds of load counted (none in hello mode: it ends when every connection is done). @default {3} */
  duration?: number;
  /** Seconds of load before the counting starts (rr, bulk, churn). @default {0.5} */
  warmup?: number;
  /** Seconds an operation may take before it counts as timed out. @default {5} */
  timeout?: number;
  /** The server's process: the report gives the CPU time it used while counting (Linux). */
  serverPid?: number;
}

/** What bench/loadgen prints (schema `echo-loadgen/1`). */
export interface LoadgenReport {
  /** `echo-loadgen/1`. */
  schema: string;
  /** What was asked, and the seconds counted. */
  load: { mode: string; connections: number; size: number; seconds: number };
  /** What was measured. */
  summary: {
    /** Round trips, connections (churn) or bytes (bulk) completed in time. */
    ops: number;
    /** What `ops` counts. */
    unit: "round trips" | "connections" | "bytes";
    perSecond: number;
    bytesPerSecond: number;
    /** Connections that failed (refused, reset, wrong bytes, timed out). */
    failed: number;
    /** Of those, the ones that timed out. */
    timeouts: number;
    /** Latency in milliseconds: min, p50, p99, p999, max (none in bulk mode). */
    ms: { min?: number; p50?: number; p99?: number; p999?: number; max?: number };
    /** Jain's fairness index over the connections' operations. */
    jain: number;
    /** The least-served connection's operations relative to the mean. */
    worst: number;
    /** Why the first failed connection failed. */
    error?: string;
    /** CPU seconds the server used while counting (user and system), with `serverPid`. */
    serverCpuSeconds?: number;
  };
}

/**
 * Runs bench/loadgen once.
 *
 * @param loadgen Its path, from {@linkcode buildNative}.
 * @param options The load.
 * @returns Its report (also when connections failed: `summary.failed` says how many).
 */
export async function runLoadgen(loadgen: string, options: LoadgenOptions): Promise<LoadgenReport> {
  const { port, mode, conns, size, duration = 3, warmup = 0.5, timeout = 5 } = options;
  const flags = { port, mode, conns, size, duration, warmup, timeout };
  const args = Object.entries(flags).flatMap(([name, value]) => [`-${name}`, `${value}`]);
  if (options.serverPid) args.push("-server-pid", `${options.serverPid}`);
  const { code, stdout, stderr } = await new Deno.Command(loadgen, { args }).output();
  const text = new TextDecoder().decode(stdout);
  if (code > 1 || !text.startsWith("{")) {
    throw new Error(`loadgen ${args.join(" ")}: ${new TextDecoder().decode(stderr)}`);
  }
  return JSON.parse(text);
}
