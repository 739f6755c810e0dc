/**
 * The echo server's command line: flags, one-line errors, signals, and
 * `--workers`. The server itself is server.ts, in one of the lesson's styles:
 * callbacks.ts (the default), coroutines.ts (`--style async`), or its first
 * step, one connection at a time (`--style blocking`, in coroutines.ts too).
 *
 * ```sh
 * deno run --allow-net=127.0.0.1 main.ts --port 8888 [--style async] [--trace]
 * ```
 *
 * @module
 */

import {
  allowNetFlag,
  type Flags,
  onStopSignals,
  parseCommandLine,
  SAME_SIGNAL_MS,
  UsageError,
  wholeNumber,
  withDefaults,
} from "./cli.ts";
import { createTracer, formatAddr } from "./trace.ts";
import { describeError, type Log, logTo, plural } from "./log.ts";
import { runWorkers } from "./workers.ts";
import {
  DEFAULTS,
  epollSockets,
  serve,
  type ServeOptions,
  type Server,
  type ServerStats,
} from "./server.ts";
import { unsupported } from "./libc.ts";

export {
  denoSockets,
  epollSockets,
  type LogLevel,
  serve,
  type ServeOptions,
  type Server,
  type ServerStats,
  type Sockets,
  type SocketsFactory,
  type Style,
} from "./server.ts";
export type { Log, LogFormat } from "./log.ts";
export type { AnyTraceEvent } from "./trace.ts";

/** --trace prints at most this many lines a second, then says how many it left out. */
const TRACE_LINES_PER_SECOND = 200;

const USAGE =
  `usage: deno run --allow-net=127.0.0.1 main.ts [--host H] [--port N] [--udp [--udp-rate N]] [--unix PATH] [--max-conns N] [--idle-timeout S] [--style callbacks|async|blocking] [--selector deno|epoll] [--fairness on|off] [--trace] [--log-format text|json] [--verbose | --quiet] [--workers N|auto]`;

const HELP = `An echo server (RFC 862): sends back every byte it receives, over TCP, and
over UDP or a Unix socket if asked.

${USAGE}

  --host H           address to listen on (default ${DEFAULTS.hostname}; 0.0.0.0 exposes it to the network)
  --port N           port, 0 picks a free one (default ${DEFAULTS.port})
  --max-conns N      connections served at once; more wait in the kernel's backlog (default ${DEFAULTS.maxConns})
  --idle-timeout S   close connections idle for S seconds (default ${DEFAULTS.idleTimeout}: never)
  --udp              also echo UDP datagrams on the same host and port (needs --unstable-net)
  --udp-rate N       UDP replies per second to one source address (default ${DEFAULTS.udpRate})
  --unix PATH        serve on a Unix socket instead of TCP (needs --allow-read, --allow-write
                     and --allow-net=unix: for PATH); a stale socket file is replaced
  --style STYLE      callbacks (the lesson's accept and read callbacks), async (coroutines
                     on the same loop), or blocking (the lesson's first step: one connection
                     at a time, the next waits until it closes) (default ${DEFAULTS.style})
  --selector S       deno (readiness from Deno's own sockets, inside its sandbox) or epoll
                     (Linux's epoll through the C library: faster, fair by itself; needs
                     --allow-ffi, which lifts Deno's sandbox) (default deno)
  --fairness on|off  hold back new reads while others starve, so that no connection waits
                     long when the server saturates its CPU (default on; off to measure it;
                     the epoll selector needs none)
  --trace            print what the event loop does, turn by turn (at most ${TRACE_LINES_PER_SECOND} lines a second)
  --log-format F     text, or json: one {"time", "level", "message"} object per line
                     (default ${DEFAULTS.logFormat})
  --verbose          also log every echo
  --quiet            log errors only
  --workers N        N processes share the port (SO_REUSEPORT, Linux), auto: one per CPU;
                     the parent restarts a worker that dies, and shuts all down on a signal.
                     Needs --allow-run for this Deno (deno task start:workers grants it) and
                     --unstable-net; each worker gets only --allow-net for its host.
                     --max-conns is per worker, and the first worker serves --udp
  --help             show this help

SIGINT or SIGTERM shuts down gracefully: every byte already read is echoed. A second
one exits at once (the same signal again within ${SAME_SIGNAL_MS} ms is the same request:
deno task forwards a Ctrl-C the server has already had).

Exit status: 0 after a clean shutdown (with --workers: no worker crashed; one stopped by
a SIGTERM from outside is restarted), 1 if the server could not start or a worker crashed,
2 on bad usage, 130 or 143 when a second SIGINT or SIGTERM forced the exit.`;

const FLAGS = {
  host: { type: "text" },
  port: { type: "integer", min: 0, max: 65535 },
  "max-conns": { type: "integer", min: 1 },
  "idle-timeout": { type: "number", min: 0 },
  udp: { type: "boolean" },
  "udp-rate": { type: "integer", min: 1 },
  unix: { type: "text" },
  style: { type: "text" },
  fairness: { type: "text" },
  selector: { type: "text" },
  trace: { type: "boolean" },
  "log-format": { type: "text" },
  verbose: { type: "boolean" },
  quiet: { type: "boolean" },
  workers: { type: "text" },
  // Not in --help: --workers sets it on each worker it starts, which then shares the
  // port, logs JSON lines for its parent, and shuts down when its stdin closes.
  worker: { type: "integer", min: 1 },
} as const;

/** Which selector serves: loop.ts's on Deno's sockets, or epoll.ts's on its own. */
type SelectorName = "deno" | "epoll";

/** What the command line asks for: the server's options, and how many processes serve. */
interface CommandLine extends ServeOptions {
  /** The selector. */
  selector: SelectorName;
  /** Worker processes sharing the port (1: this process serves). */
  workers: number;
  /** Set in a worker that `--workers` started: its number. */
  worker?: number;
}

/** --workers N, or auto: one per CPU. More than 4 per CPU would only compete for them. */
function workerCount(text: string | undefined): number {
  const cpus = navigator.hardwareConcurrency;
  if (text === undefined) return 1;
  if (text === "auto") return cpus;
  const count = wholeNumber(text);
  if (!Number.isInteger(count) || count < 1 || count > 4 * cpus) {
    throw new UsageError(
      `--workers must be auto or a whole number from 1 to ${4 * cpus} (4 per CPU), got "${text}"`,
    );
  }
  return count;
}

/** Reads the command line into serve() options, or throws a UsageError. */
function optionsFrom(flags: Flags<typeof FLAGS>): CommandLine {
  if (flags.verbose && flags.quiet) {
    throw new UsageError("--verbose and --quiet do not go together");
  }
  const { style } = flags;
  if (style !== undefined && style !== "callbacks" && style !== "async" && style !== "blocking") {
    throw new UsageError(`--style must be callbacks, async or blocking, got "${style}"`);
  }
  if (style === "blocking" && flags.udp) {
    throw new UsageError("--style blocking waits on one connection at a time: not with --udp");
  }
  const { fairness, selector = "deno" } = flags;
  if (fairness !== undefined && fairness !== "on" && fairness !== "off") {
    throw new UsageError(`--fairness must be on or off, got "${fairness}"`);
  }
  if (selector !== "deno" && selector !== "epoll") {
    throw new UsageError(`--selector must be deno or epoll, got "${selector}"`);
  }
  if (flags.unix !== undefined) {
    if (flags.host !== undefined || flags.port !== undefined || flags.udp) {
      throw new UsageError("--unix serves on a socket file: not with --host, --port or --udp");
    }
  }
  if (flags["udp-rate"] !== undefined && !flags.udp) {
    throw new UsageError("--udp-rate needs --udp");
  }
  const logFormat = flags["log-format"];
  if (logFormat !== undefined && logFormat !== "text" && logFormat !== "json") {
    throw new UsageError(`--log-format must be text or json, got "${logFormat}"`);
  }
  const workers = workerCount(flags.workers);
  if (workers > 1 && flags.unix !== undefined) {
    throw new UsageError("--workers share a TCP port: not with --unix");
  }
  if (flags.worker !== undefined && flags.workers !== undefined) {
    throw new UsageError("--worker is set by --workers for each worker it starts: not both");
  }
  const idleSeconds = flags["idle-timeout"];
  return {
    selector,
    workers,
    worker: flags.worker,
    logFormat,
    hostname: flags.host,
    port: flags.port,
    udp: flags.udp,
    udpRate: flags["udp-rate"],
    unixPath: flags.unix,
    maxConns: flags["max-conns"],
    idleTimeout: idleSeconds === undefined ? undefined : idleSeconds * 1000,
    logLevel: flags.quiet ? "quiet" : flags.verbose ? "verbose" : undefined,
    style,
    fairness: fairness === undefined ? undefined : fairness === "on",
    trace: flags.trace ? tracer(logFormat === "json" || flags.worker !== undefined) : undefined,
  };
}

/** --trace: lines of text, or, beside JSON log lines (a worker's too), JSON lines of their own. */
function tracer(json: boolean) {
  const log = json ? logTo("json") : undefined;
  const write = log && ((line: string) => log.info(line, { event: "trace" }));
  return createTracer({ maxPerSecond: TRACE_LINES_PER_SECOND, ...(write ? { write } : {}) });
}

/** Why the epoll selector cannot run in this process, or undefined if it can. */
function epollUnavailable(): string | undefined {
  const why = unsupported();
  if (why) return `cannot run here: ${why}; use --selector deno`;
  if (Deno.permissions.querySync({ name: "ffi" }).state !== "granted") {
    return "calls the C library: add --allow-ffi (it lifts Deno's sandbox: see docs/operations.md)";
  }
}

/** Why listening failed, in one line with what to do about it. */
function listenError(error: unknown, options: typeof DEFAULTS): string {
  const { hostname: host, port, unixPath: path, udp } = options;
  if (path) {
    if (error instanceof Deno.errors.NotCapable) {
      return `no permission to use the socket ${path}: run with --allow-read=${path} --allow-write=${path} --allow-net=unix:${path}`;
    }
    if (error instanceof Deno.errors.NotFound) {
      const slash = path.lastIndexOf("/");
      const directory = slash > 0 ? path.slice(0, slash) : slash === 0 ? "/" : ".";
      return `cannot listen on ${path}: the directory ${directory} does not exist (create it, or choose another path with --unix)`;
    }
    return `cannot listen on ${path}: ${describeError(error)}`;
  }
  const where = host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
  if (error instanceof TypeError && /numeric addresses/.test(error.message)) {
    return `cannot listen on "${host}": --selector epoll takes numeric addresses and localhost (resolve the name first, or use --selector deno)`;
  }
  if (error instanceof Deno.errors.AddrInUse) {
    const protocols = udp ? " (for TCP or UDP)" : "";
    return `port ${port} on ${host} is already in use${protocols}: stop the other server or choose another port with --port`;
  }
  if (error instanceof Deno.errors.NotCapable) {
    const task = host === "127.0.0.1" ? " (deno task start does)" : "";
    return `no permission to listen on ${where}: run with ${allowNetFlag(host)}${task}`;
  }
  if (error instanceof Deno.errors.AddrNotAvailable) {
    return `cannot listen on ${host}: it is not an address of this machine (check --host)`;
  }
  if (error instanceof Deno.errors.PermissionDenied) {
    // Only for a user without the privilege: the tests run as root, which may bind any port.
    return `not allowed to listen on ${where}: ports below 1024 need privileges; choose another with --port`;
  }
  if (/failed to lookup address/i.test(String(error))) {
    return `cannot resolve host "${host}": check --host`;
  }
  return `cannot listen on ${where}: ${describeError(error)}`;
}

/**
 * Makes way for a Unix socket at `path`: a socket file nothing listens on (a
 * crashed server's) is removed; anything else is left alone.
 *
 * @returns Why the server cannot use `path`, or undefined if it can.
 */
async function claimUnixPath(
  path: string,
  log: Log | undefined,
): Promise<string | undefined> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.lstat(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined; // free
    throw error; // e.g. no permission: reported as for listening
  }
  if (!info.isSocket) {
    const what = info.isDirectory ? "a directory" : info.isFile ? "a regular file" : "not a socket";
    return `${path} is ${what}: choose another path with --unix (it was left untouched)`;
  }
  try {
    (await Deno.connect({ transport: "unix", path })).close();
    return `another server is listening on ${path}: stop it or choose another path with --unix`;
  } catch (error) {
    if (!(error instanceof Deno.errors.ConnectionRefused)) throw error;
  }
  await Deno.remove(path); // stale: left by a server that did not shut down
  log?.info(`removed the stale socket file ${path}: nothing was listening on it`, {
    event: "stale-socket-removed",
    path,
  });
  return undefined;
}

function isLoopback(host: string): boolean {
  return host.startsWith("127.") || host === "::1" ||
    host === "::ffff:127.0.0.1";
}

/**
 * Runs the server from the command line until SIGINT or SIGTERM.
 *
 * @param args The command-line arguments.
 * @returns The exit code: 0 after a clean shutdown, 1 if it could not start, 2 on bad usage.
 */
export async function main(args: string[]): Promise<number> {
  const parsed = parseCommandLine(
    args,
    FLAGS,
    { name: "main.ts", help: HELP },
    optionsFrom,
  );
  if ("exit" in parsed) return parsed.exit;
  const { selector, workers, worker, ...serveOptions } = parsed.options;
  const options = withDefaults(serveOptions, DEFAULTS);
  const epoll = selector === "epoll";
  if (epoll) {
    const why = epollUnavailable();
    if (why) {
      console.error(`main.ts: --selector epoll ${why}`);
      return 1;
    }
  }
  // Deno's UDP and SO_REUSEPORT need --unstable-net; the epoll selector's sockets do not.
  const unstable = epoll || typeof Deno.listenDatagram === "function";
  if (options.udp && !unstable) {
    console.error(
      "main.ts: --udp needs Deno's unstable UDP API: add --unstable-net to deno run (the tasks have it, from deno.json)",
    );
    return 2;
  }
  if (workers > 1) {
    return await startWorkers(options, workers, {
      selector,
      trace: serveOptions.trace !== undefined,
    });
  }
  if (worker !== undefined && !unstable) {
    console.error("main.ts: --worker shares its port (SO_REUSEPORT): add --unstable-net");
    return 2;
  }
  // A worker logs JSON lines for its parent, and always says when it listens and what it served.
  const log = worker !== undefined
    ? logTo("json", { worker })
    : options.logLevel === "quiet"
    ? undefined
    : logTo(options.logFormat);
  let server: Server;
  try {
    const unavailable = options.unixPath && await claimUnixPath(options.unixPath, log);
    if (unavailable) {
      console.error(`main.ts: ${unavailable}`);
      return 1;
    }
    const shared = worker === undefined ? {} : { reusePort: true, log };
    server = serve({ ...options, ...shared, ...(epoll ? { sockets: epollSockets } : {}) });
  } catch (error) {
    console.error(`main.ts: ${listenError(error, options)}`);
    return 1;
  }
  // The first SIGINT or SIGTERM shuts down gracefully; a second one exits at once,
  // with the status a shell gives a process killed by that signal. A worker
  // leaves SIGINT (which a terminal sends its parent too) to its parent, which
  // stops it by closing its stdin.
  let stopping = false;
  const stop = (how: string) => {
    stopping = true;
    const { open } = server.stats;
    log?.info(`shutting down: ${plural(open, "connection")} to finish (${how})`, {
      event: "stopping",
      open,
    });
    server.close();
  };
  const removeSignalListeners = onStopSignals({
    stop: (signal) => stop(`${signal} again to force`),
    force: (status) => Deno.exit(status),
    stopping: () => stopping,
    ignore: worker === undefined ? undefined : "SIGINT",
  });
  if (worker !== undefined) {
    untilEnd(Deno.stdin).then(() => stopping || stop("the parent closed stdin"));
  }
  // Announce only now: whoever waits for this line may signal at once.
  const { addr } = server;
  const address = formatAddr(addr);
  const exposed = "hostname" in addr && !isLoopback(addr.hostname);
  const port = "port" in addr ? addr.port : undefined;
  log?.info(
    `listening on ${address}${exposed ? " (reachable from the network)" : ""}`,
    { event: "listening", address, port, exposed },
  );
  await server.finished;
  removeSignalListeners();
  const { accepted, peak, bytes, failed, datagrams, dropped } = server.stats;
  const udp = options.udp ? { datagrams, dropped } : {};
  log?.info(summary(server.stats, options.udp), {
    event: "summary",
    stats: { accepted, peak, bytes, failed, ...udp },
  });
  return 0;
}

/** Resolves when a stream (a worker's stdin) ends: its parent closed it, or died. */
async function untilEnd(stream: { read(p: Uint8Array): Promise<number | null> }): Promise<void> {
  const buffer = new Uint8Array(64);
  try {
    while (await stream.read(buffer) !== null); // anything written is ignored
  } catch {
    // an error ends it too
  }
}

/**
 * `--workers N`: this process starts N workers (`main.ts --worker ID`) on one
 * port and watches them (workers.ts). Each gets exactly what it needs: the
 * network on its host, and `--unstable-net` for SO_REUSEPORT.
 */
async function startWorkers(
  options: typeof DEFAULTS,
  count: number,
  how: { selector: SelectorName; trace: boolean },
): Promise<number> {
  if (Deno.build.os !== "linux") {
    // Only off Linux, where no test of ours runs.
    console.error(
      "main.ts: --workers share a port through SO_REUSEPORT, which Deno offers on Linux only: run one server per port instead",
    );
    return 1;
  }
  const deno = Deno.execPath(); // the workers run the Deno that runs this
  if ((await Deno.permissions.query({ name: "run", command: deno })).state !== "granted") {
    console.error(
      `main.ts: --workers starts its workers with this Deno: add --allow-run=${deno} (deno task start:workers does)`,
    );
    return 1;
  }
  const { hostname, maxConns, idleTimeout, style, fairness, logLevel, udp, udpRate } = options;
  const ffi = how.selector === "epoll" ? ["--allow-ffi"] : [];
  const level = logLevel === "quiet" ? ["--quiet"] : logLevel === "verbose" ? ["--verbose"] : [];
  const flags = [
    ...["--host", hostname, "--max-conns", `${maxConns}`, "--style", style],
    ...["--fairness", fairness ? "on" : "off", "--selector", how.selector],
    ...["--idle-timeout", `${idleTimeout / 1000}`, ...level, ...(how.trace ? ["--trace"] : [])],
  ];
  return await runWorkers({
    count,
    port: options.port,
    logFormat: options.logFormat,
    quiet: logLevel === "quiet",
    command: (id, port) => [
      ...["run", allowNetFlag(hostname), "--unstable-net", ...ffi, import.meta.url, ...flags],
      ...["--port", `${port}`, "--worker", `${id}`],
      // UDP is one socket: the first worker serves it.
      ...(udp && id === 1 ? ["--udp", "--udp-rate", `${udpRate}`] : []),
    ],
  });
}

/** The shutdown summary: one line for the whole run. */
function summary(stats: ServerStats, udp: boolean): string {
  const seconds = ((performance.now() - stats.started) / 1000).toFixed(1);
  const datagrams = udp
    ? `, ${plural(stats.datagrams, "datagram")} echoed and ${stats.dropped} not answered`
    : "";
  return `served ${plural(stats.accepted, "connection")} (at most ${stats.peak} at once) in ` +
    `${seconds} s: ${plural(stats.bytes, "byte")} echoed${datagrams}; ` +
    `${plural(stats.failed, "connection")} ended in an error`;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
