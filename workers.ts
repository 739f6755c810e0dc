/**
 * Every core: `main.ts --workers N` runs N copies of the server as worker
 * processes that share one port through SO_REUSEPORT, so the kernel spreads
 * connections over them, and keeps them running. Processes, not Web Workers:
 * a worker that dies (out of memory, a native crash) takes no other down, and
 * an operator can see and signal each one (`ps` shows `main.ts --worker 2`).
 *
 * The parent owns the signals and talks to its workers through their standard
 * streams:
 *
 * - each worker writes one JSON object per log line on stdout and stderr; the
 *   parent prints them as its own (text or JSON), each tagged with the worker;
 * - a worker's `listening` line says its port; the parent announces the pool
 *   once all listen, and its `summary` line gives its counts at the end;
 * - the parent closes a worker's stdin to stop it: the worker shuts down and
 *   exits, as the single-process server does on SIGTERM. A parent that dies,
 *   even of SIGKILL, closes every worker's stdin with it: no orphan.
 *
 * A worker that dies while serving is logged and restarted with back-off; one
 * that cannot start at all (a port in use) stops the pool with its error.
 *
 * @module
 */

import { onStopSignals } from "./cli.ts";
import { type LogFormat, logTo, plural } from "./log.ts";

/** What {@linkcode runWorkers} needs to start and watch its workers. */
export interface WorkerPoolOptions {
  /** How many workers. */
  count: number;
  /** The port asked for; 0: the first worker picks one and the others share it. */
  port: number;
  /** The arguments to this Deno (`Deno.execPath()`) that start worker `id` on `port`. */
  command(id: number, port: number): string[];
  /** How the parent prints its lines and its workers': text, or JSON lines. */
  logFormat: LogFormat;
  /** Errors only (`--quiet`). */
  quiet: boolean;
}

/** What a worker counted, from its summary line. */
interface WorkerStats {
  accepted: number;
  bytes: number;
  failed: number;
}

/** A worker restarts after this pause, doubled for each crash within STABLE_MS of its start. */
const FIRST_BACKOFF_MS = 100;
const MAX_BACKOFF_MS = 10_000;
const STABLE_MS = 10_000;

/** A worker's log line, parsed: its JSON object, or a plain line wrapped as one. */
interface Line {
  time: string;
  level: string;
  message: string;
  worker: number;
  /** On a worker's two lines for the parent: it listens (`address`), or its counts (`stats`). */
  event?: "listening" | "summary";
  [field: string]: unknown;
}

/** One worker process, from its start to its exit. */
class WorkerProcess {
  readonly child: Deno.ChildProcess;
  readonly started = performance.now();
  /** Resolves with the worker's listening line. */
  readonly listening = Promise.withResolvers<Line>();
  /** Settles when the process has exited and its output has been read. */
  readonly exited: Promise<Deno.CommandStatus>;
  /** The last line it wrote on stderr: why it could not start. */
  lastError = "";
  /** Its counts, from its summary line: a worker that shut down cleanly has them. */
  stats: WorkerStats | undefined = undefined;

  constructor(readonly id: number, args: string[], print: (line: Line) => void) {
    const io = { stdin: "piped", stdout: "piped", stderr: "piped" } as const;
    // This Deno, not whichever `deno` comes first on PATH: the workers run what the parent runs.
    this.child = new Deno.Command(Deno.execPath(), { args, ...io }).spawn();
    const output = Promise.all([
      eachLine(this.child.stdout, (text) => this.#read(parseLine(text, "info", id), print)),
      eachLine(this.child.stderr, (text) => this.#read(parseLine(text, "error", id), print)),
    ]);
    this.exited = output.then(() => this.child.status);
  }

  get pid(): number {
    return this.child.pid;
  }

  /** Ends the worker at once, if it still runs. */
  kill(): void {
    try {
      this.child.kill("SIGKILL");
    } catch {
      // exited already
    }
  }

  /** Asks the worker to shut down and exit: closes its stdin. */
  stop(): void {
    this.child.stdin.close().catch(() => {}); // closed already
  }

  #read(line: Line, print: (line: Line) => void): void {
    if (line.level === "error") this.lastError = line.message;
    if (line.event === "listening") this.listening.resolve(line);
    if (line.event === "summary") this.stats = line.stats as WorkerStats;
    print(line);
  }
}

function parseLine(text: string, level: string, worker: number): Line {
  if (text.startsWith("{")) {
    try {
      return { ...JSON.parse(text), worker };
    } catch {
      // not one of ours: shown as it is
    }
  }
  return { time: new Date().toISOString(), level, message: text, worker };
}

/** Calls `onLine` for each line of a byte stream, to its end. */
async function eachLine(stream: ReadableStream<Uint8Array>, onLine: (line: string) => void) {
  let rest = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    const lines = (rest + chunk).split("\n");
    rest = lines.pop()!;
    for (const line of lines) onLine(line);
  }
  if (rest) onLine(rest);
}

/**
 * Runs the pool until SIGINT or SIGTERM, then shuts every worker down.
 *
 * @param options How many workers, how to start one, and where to log.
 * @returns The exit code: 0 if every worker served to the end and shut down (one
 * stopped by a SIGTERM from outside was restarted and counts as served); 1 if
 * one crashed (it was restarted), did not shut down cleanly, or the pool could
 * not start; 2 if a worker refused its flags.
 */
export async function runWorkers(options: WorkerPoolOptions): Promise<number> {
  const { count, command, logFormat, quiet } = options;
  const workers = new Map<number, WorkerProcess>(); // by id: the current process of each
  const restarts = new Map<number, ReturnType<typeof setTimeout>>();
  const totals: WorkerStats = { accepted: 0, bytes: 0, failed: 0 };
  const started = performance.now();
  let crashed = 0; // workers that died while the pool was serving
  let stoppedFromOutside = 0; // workers stopped by a SIGTERM from outside the pool
  let unclean = 0; // workers that did not shut down cleanly, with a summary
  let stopping = false;
  let serving = false;

  /** The parent's own lines, in the log format. */
  const log = logTo(logFormat);
  const say = (message: string, fields?: Record<string, unknown>) =>
    quiet || log.info(message, fields);

  /** Prints a worker's line as the parent's, tagged with the worker. */
  const print = (worker: Line) => {
    const isError = worker.level === "error";
    if (worker.event === "listening" || (!isError && quiet)) return; // announced for the pool
    if (isError && !serving) return; // a worker that cannot start: said once, below
    const text = logFormat === "json"
      ? JSON.stringify(worker)
      : `worker ${worker.worker}: ${worker.message}`;
    (isError ? console.error : console.log)(text);
  };

  /** Starts worker `id`; resolves with it once it listens, or undefined if it exited first. */
  const start = async (id: number, port: number): Promise<WorkerProcess | undefined> => {
    if (stopping) return undefined; // a signal came: start nothing more
    const worker = new WorkerProcess(id, command(id, port), print);
    workers.set(id, worker);
    return await Promise.race([
      worker.listening.promise.then(() => worker),
      worker.exited.then(() => undefined),
    ]);
  };

  /**
   * When a worker exits while the pool serves, starts it again after a pause. A
   * worker shuts down cleanly only when told to: while the pool serves, that is
   * a SIGTERM from outside it (it leaves SIGINT to the parent), not a crash.
   */
  const watch = (worker: WorkerProcess, port: number, backoff = FIRST_BACKOFF_MS) => {
    worker.exited.then((status) => {
      if (worker.stats) add(totals, worker.stats);
      if (stopping) {
        if (status.code !== 0 || !worker.stats) unclean++;
        return;
      }
      const stoppedOutside = status.code === 0 && worker.stats !== undefined;
      const wait = stoppedOutside || performance.now() - worker.started >= STABLE_MS
        ? FIRST_BACKOFF_MS
        : backoff;
      const again = `restarting in ${(wait / 1000).toFixed(1)} s`;
      const who = `worker ${worker.id} (pid ${worker.pid})`;
      const fields = { worker: worker.id, pid: worker.pid };
      if (stoppedOutside) {
        stoppedFromOutside++;
        say(`${who} was stopped by SIGTERM from outside the pool; ${again}`, {
          event: "worker-stopped",
          ...fields,
        });
      } else {
        crashed++;
        const how = status.signal ? `killed by ${status.signal}` : `exit code ${status.code}`;
        log.error(`${who} died: ${how}; ${again}`, {
          event: "worker-died",
          ...fields,
          code: status.code,
          signal: status.signal,
        });
      }
      const next = stoppedOutside ? backoff : Math.min(MAX_BACKOFF_MS, wait * 2);
      restarts.set(
        worker.id,
        setTimeout(async () => {
          restarts.delete(worker.id);
          const started = await start(worker.id, port);
          if (started && !stopping) say(`worker ${worker.id} serves again, pid ${started.pid}`);
          watch(workers.get(worker.id)!, port, next);
        }, wait),
      );
    });
  };

  // The first SIGINT or SIGTERM shuts every worker down; a second one kills them and exits.
  // Installed before any worker starts: a signal during the start stops those started.
  const allStopped = Promise.withResolvers<void>();
  const removeSignalListeners = onStopSignals({
    stop: (signal) => {
      stopping = true;
      for (const timer of restarts.values()) clearTimeout(timer);
      say(`shutting down ${plural(workers.size, "worker")} (${signal} again to force)`);
      for (const worker of workers.values()) worker.stop();
      Promise.all([...workers.values()].map((worker) => worker.exited)).then(() =>
        allStopped.resolve()
      );
    },
    force: (status) => {
      for (const worker of workers.values()) worker.kill();
      Deno.exit(status);
    },
  });

  // The first worker picks the port if asked for 0; the others share it.
  const first = await start(1, options.port);
  const port = first ? Number((await first.listening.promise).port) : options.port;
  const pool = first
    ? [first, ...await Promise.all(range(2, count).map((id) => start(id, port)))]
    : [undefined];
  const failed = pool.indexOf(undefined);
  if (failed >= 0 && !stopping) {
    for (const worker of workers.values()) worker.stop();
    const worker = workers.get(failed + 1)!;
    const [{ code }] = await Promise.all([worker.exited, ...pool.map((w) => w?.exited)]);
    removeSignalListeners();
    console.error(worker.lastError || `main.ts: worker ${worker.id} could not start`);
    return code === 2 ? 2 : 1;
  }
  if (!stopping) {
    serving = true;
    const { address, exposed } = await first!.listening.promise;
    const pids = pool.map((worker) => worker!.pid).join(", ");
    const reachable = exposed ? " (reachable from the network)" : "";
    say(`listening on ${address} with ${count} workers (pids ${pids})${reachable}`, {
      event: "listening",
      address,
      port,
      exposed,
      pids: pool.map((worker) => worker!.pid),
    });
  }
  for (const worker of workers.values()) watch(worker, port);

  await allStopped.promise;
  removeSignalListeners();
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  const restarted = (crashed ? `; ${plural(crashed, "worker")} crashed and restarted` : "") +
    (stoppedFromOutside
      ? `; ${plural(stoppedFromOutside, "worker")} stopped from outside and restarted`
      : "");
  const { accepted, bytes, failed: errors } = totals;
  say(
    `served ${plural(accepted, "connection")} with ${count} workers in ${seconds} s: ` +
      `${plural(bytes, "byte")} echoed; ${plural(errors, "connection")} ended in an error` +
      restarted,
    { event: "summary", stats: { accepted, bytes, failed: errors, crashed, stoppedFromOutside } },
  );
  return crashed || unclean ? 1 : 0;
}

function add(total: WorkerStats, stats: WorkerStats): void {
  total.accepted += stats.accepted;
  total.bytes += stats.bytes;
  total.failed += stats.failed;
}

function range(from: number, to: number): number[] {
  return Array.from({ length: to - from + 1 }, (_, i) => from + i);
}
