/**
 * Test helpers, one per job (they import no @std package, so that
 * `deno task check` can check them offline): connect, move bytes exactly, wait for a condition
 * with a deadline, run the scripts as a user would (servers that are always
 * stopped, even when a test fails), reset storms, and a process's usage.
 *
 * Nothing here waits forever: every wait has a deadline and fails with a
 * message that says what did not happen.
 *
 * @module
 */

import { epollSockets, serve, type ServeOptions, type Server, type Style } from "../server.ts";

const root = new URL("../", import.meta.url);

/** The server's two styles: every server test runs once in each. */
export const STYLES: readonly Style[] = ["callbacks", "async"];

/** The server's two selectors: loop.ts's, on Deno's sockets, and epoll.ts's (`--selector`). */
export const SELECTORS = ["deno", "epoll"] as const;

/** One of {@linkcode SELECTORS}. */
export type SelectorName = typeof SELECTORS[number];

/** How a test's servers are built: spread it into serveForTest()'s or ServerProcess's options. */
export interface Variant {
  /** The server's style. */
  style: Style;
  /** The server's selector. */
  selector: SelectorName;
}

/** Every style on every selector. */
const VARIANTS: Variant[] = SELECTORS.flatMap((selector) =>
  STYLES.map((style) => ({ style, selector }))
);

/** The stream transports the server speaks: TCP over IPv4 and IPv6, and Unix sockets. */
export const TRANSPORTS = ["tcp4", "tcp6", "unix"] as const;

/** One of {@linkcode TRANSPORTS}. */
export type Transport = typeof TRANSPORTS[number];

/**
 * Registers one test per server style and selector, named `name [style, selector]`.
 *
 * @param name What the test checks.
 * @param fn The test, given the style and selector to start servers with.
 * @param selectors The selectors it applies to, if not all.
 */
export function testEachStyle(
  name: string,
  fn: (variant: Variant) => Promise<void>,
  selectors: readonly SelectorName[] = SELECTORS,
): void {
  for (const variant of VARIANTS) {
    if (!selectors.includes(variant.selector)) continue;
    Deno.test(`${name} [${variant.style}, ${variant.selector}]`, () => fn(variant));
  }
}

/**
 * Registers one test per server style, selector and stream transport, named
 * `name [style, selector, transport]`.
 *
 * @param name What the test checks.
 * @param fn The test, given how to start servers, and the transport.
 */
export function testEachTransport(
  name: string,
  fn: (variant: Variant, transport: Transport) => Promise<void>,
): void {
  for (const variant of VARIANTS) {
    for (const transport of TRANSPORTS) {
      const { style, selector } = variant;
      Deno.test(`${name} [${style}, ${selector}, ${transport}]`, () => fn(variant, transport));
    }
  }
}

/**
 * The tests' Unix sockets. Deno grants net access to a Unix socket by its
 * exact, absolute path, and deno.json cannot name a path relative to itself,
 * so they live at fixed paths in /tmp, which deno.json's `test.permissions`
 * grant, and no others.
 */
export const SOCKET_NAMES = ["server.sock", "other.sock"] as const;

/**
 * The path of one of the tests' Unix sockets, with nothing left at it.
 *
 * @param name One of {@linkcode SOCKET_NAMES}.
 * @returns Its absolute path.
 */
export function socketPath(name: typeof SOCKET_NAMES[number] = "server.sock"): string {
  const path = `/tmp/echo-lesson-test-${name}`;
  try {
    Deno.removeSync(path, { recursive: true });
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  return path;
}

/** Where a server listens: a TCP address, or a Unix socket. */
export type Target = { hostname: string; port: number } | { transport: "unix"; path: string };

/**
 * The serve() options for a transport: IPv4 or IPv6 loopback on a free port, or a Unix socket.
 *
 * @param transport The transport.
 * @returns Options to merge into serve()'s.
 */
export function listenOn(transport: Transport): ServeOptions {
  if (transport === "unix") return { unixPath: socketPath() };
  return { hostname: transport === "tcp6" ? "::1" : "127.0.0.1", port: 0 };
}

/**
 * main.ts's arguments and permissions for a transport, as a user would give them.
 *
 * @param transport The transport.
 * @returns The arguments and the permissions for the server process.
 */
export function argsFor(transport: Transport): { args: string[]; permissions: string[] } {
  if (transport === "unix") {
    const path = socketPath();
    return {
      args: ["--unix", path],
      permissions: [`--allow-read=${path}`, `--allow-write=${path}`, `--allow-net=unix:${path}`],
    };
  }
  const host = transport === "tcp6" ? "::1" : "127.0.0.1";
  return {
    args: ["--host", host, "--port", "0"],
    permissions: [`--allow-net=${transport === "tcp6" ? "[::1]" : host}`],
  };
}

/**
 * Where a server listens, from its address.
 *
 * @param addr The listener's address.
 * @returns The target to connect to.
 */
export function targetOf(addr: Deno.Addr): Target {
  if (addr.transport === "unix") return { transport: "unix", path: addr.path };
  return { hostname: (addr as Deno.NetAddr).hostname, port: (addr as Deno.NetAddr).port };
}

/** How long a step may take before the test fails instead of hanging. */
export const STEP_TIMEOUT_MS = 10_000;

/**
 * Settles as `promise` does, or rejects after `ms` with an error that says
 * what did not happen.
 *
 * @param promise What to wait for.
 * @param what What it is, for the message ("the echo"), or a function that says it then.
 * @param ms How long to wait at most.
 * @returns The promise's value.
 */
export async function deadline<T>(
  promise: Promise<T>,
  what: string | (() => string),
  ms = STEP_TIMEOUT_MS,
): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      reject(new Error(`${typeof what === "string" ? what : what()}: not within ${ms} ms`));
    }, ms);
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Polls `condition` every 20 ms until it holds; fails with `what` if it does
 * not within `ms`.
 *
 * @param condition What must become true.
 * @param what What it means, for the message.
 * @param ms How long to wait at most.
 */
export async function waitUntil(
  condition: () => boolean,
  what: string,
  ms = STEP_TIMEOUT_MS,
): Promise<void> {
  for (const end = performance.now() + ms; !condition();) {
    if (performance.now() > end) throw new Error(`${what}: not within ${ms} ms`);
    await delay(20);
  }
}

/** Resolves after `ms` milliseconds. */
export function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Connects to a server, over TCP with TCP_NODELAY (small writes go at once).
 *
 * @param to The server's port on 127.0.0.1, or where it listens.
 * @returns The connection.
 */
export async function connect(to: number | Target): Promise<Deno.Conn> {
  const target = typeof to === "number" ? { hostname: "127.0.0.1", port: to } : to;
  const where = "path" in target ? target.path : `port ${target.port}`;
  const connecting: Promise<Deno.Conn> = "path" in target
    ? Deno.connect(target)
    : Deno.connect(target);
  const conn = await deadline(connecting, `connect to ${where}`);
  if (conn.remoteAddr.transport === "tcp") (conn as Deno.TcpConn).setNoDelay(true);
  return conn;
}

/**
 * A connected TCP pair on loopback, without a server.
 *
 * @returns [our end, the peer's end].
 */
export async function connectedPair(): Promise<[Deno.Conn, Deno.Conn]> {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const [ours, peer] = await Promise.all([
    deadline(listener.accept(), "accept"),
    connect(listener.addr.port),
  ]);
  return [ours, peer];
}

/** Writes all of `bytes` to `conn`. */
export async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let sent = 0; sent < bytes.length;) sent += await conn.write(bytes.subarray(sent));
}

/**
 * Joins byte chunks into one array.
 *
 * @param chunks The chunks, in order.
 * @returns Their bytes, one after another.
 */
export function concat(chunks: Uint8Array[]): Uint8Array {
  const all = new Uint8Array(chunks.reduce((sum, chunk) => sum + chunk.length, 0));
  let offset = 0;
  for (const chunk of chunks) {
    all.set(chunk, offset);
    offset += chunk.length;
  }
  return all;
}

/**
 * A free loopback TCP port: the kernel's pick, released at once.
 *
 * @returns The port.
 */
export function freePort(): number {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  return listener.addr.port;
}

/**
 * Waits until something accepts connections on `port` (a server that prints
 * no listening line, under `--quiet`).
 *
 * @param port The port on 127.0.0.1.
 * @param ms How long it may take.
 */
export async function untilListening(port: number, ms = STEP_TIMEOUT_MS): Promise<void> {
  for (const end = performance.now() + ms; performance.now() < end;) {
    try {
      (await Deno.connect({ hostname: "127.0.0.1", port })).close();
      return;
    } catch {
      await delay(50);
    }
  }
  throw new Error(`nothing listening on port ${port} within ${ms} ms`);
}

/**
 * Reads until EOF, or until `limit` bytes came; fails if that takes over `ms`.
 *
 * @param conn Where to read.
 * @param limit How many bytes to read at most.
 * @param ms How long it may take.
 * @returns The bytes.
 */
export function readAll(
  conn: Deno.Conn,
  limit = Infinity,
  ms = STEP_TIMEOUT_MS,
): Promise<Uint8Array> {
  let total = 0;
  const reading = (async () => {
    const chunks: Uint8Array[] = [];
    const buffer = new Uint8Array(64 * 1024);
    while (total < limit) {
      const n = await conn.read(buffer.subarray(0, Math.min(buffer.length, limit - total)));
      if (n === null) break;
      chunks.push(buffer.slice(0, n));
      total += n;
    }
    return concat(chunks);
  })();
  const until = limit === Infinity ? "EOF" : `${limit} bytes`;
  return deadline(reading, () => `reading until ${until} (got ${total})`, ms);
}

/**
 * Sends `bytes` and checks that exactly they come back.
 *
 * @param conn A connection to an echo server.
 * @param bytes What to send.
 */
export async function roundTrip(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  await writeAll(conn, bytes);
  const echoed = await readAll(conn, bytes.length);
  const differs = echoed.findIndex((byte, i) => byte !== bytes[i]);
  if (echoed.length !== bytes.length || differs >= 0) {
    const at = differs >= 0 ? differs : Math.min(echoed.length, bytes.length);
    throw new Error(`the echo differs from byte ${at}: sent ${bytes.length}, got ${echoed.length}`);
  }
}

/**
 * Sends `bytes`, half-closes, and returns everything echoed until EOF.
 *
 * @param to The echo server's port on 127.0.0.1, or where it listens.
 * @param bytes What to send.
 * @returns The echo.
 */
export async function echo(to: number | Target, bytes: Uint8Array): Promise<Uint8Array> {
  const conn = await connect(to);
  try {
    const [, echoed] = await Promise.all([
      writeAll(conn, bytes).then(() => conn.closeWrite()),
      readAll(conn),
    ]);
    return echoed;
  } finally {
    conn.close();
  }
}

/** A seeded pseudo-random generator (xorshift32) in [0, 1): the same seed, the same numbers. */
export function seededRandom(seed: number): () => number {
  let state = (seed >>> 0) || 1;
  return () => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) / 4294967296;
  };
}

/** Bytes that differ by position, so a lost, doubled or moved byte shows. */
export function pattern(length: number, seed = 0): Uint8Array {
  const bytes = new Uint8Array(length);
  for (let i = 0; i < length; i++) bytes[i] = (i * 31 + seed + (i >>> 8)) & 0xff;
  return bytes;
}

/**
 * An in-process server on a free port, quiet, with the port (NaN on a Unix
 * socket) and the target to connect to. `await using` closes it at the end
 * of the scope, even when the test fails. A shutdown that hangs is
 * reported on stderr rather than thrown, so that it cannot hide the test's
 * own error; the test then fails on the operations it leaks.
 *
 * @param options Other serve() options.
 * @returns The running server.
 */
export function serveForTest(
  options: ServeOptions & { selector?: SelectorName } = {},
): Server & AsyncDisposable & { port: number; target: Target } {
  const { selector, ...serveOptions } = options;
  const sockets = selector === "epoll" ? { sockets: epollSockets } : {};
  const server = serve({ port: 0, logLevel: "quiet", ...sockets, ...serveOptions });
  const dispose = () =>
    deadline(server.close(), "the test server's shutdown", 5000).catch((error) => {
      console.error(error.message);
    });
  const target = targetOf(server.addr);
  const port = "port" in target ? target.port : NaN;
  return Object.assign(server, { [Symbol.asyncDispose]: dispose, port, target });
}

/**
 * Peers that vanish: a separate Deno process opens one connection per entry of
 * `writes`, writes that many bytes on it without reading the echo, and exits
 * without closing them, `hold` ms later or once `hold` settles. The kernel then
 * resets every connection with unread data, which is how a crashed peer looks
 * to the server (Deno cannot set SO_LINGER, and its close() sends a FIN first).
 *
 * @param port The server's port.
 * @param writes How many bytes each connection writes.
 * @param hold How long the connections stay open (ms), or until when.
 */
export async function resetStorm(
  port: number,
  writes: number[],
  hold: number | Promise<unknown> = 200,
): Promise<void> {
  const holding = typeof hold === "number"
    ? `await new Promise((resolve) => setTimeout(resolve, ${hold}));`
    : "for await (const _ of Deno.stdin.readable);"; // until our stdin closes
  const code = `
    const conns = [];
    for (const bytes of ${JSON.stringify(writes)}) {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: ${port} });
      conn.write(new Uint8Array(bytes)).catch(() => {}); // the echo is never read
      conns.push(conn);
    }
    ${holding}
    Deno.exit(0);`;
  const child = new Deno.Command("deno", {
    args: ["eval", code],
    env: { NO_COLOR: "1" },
    stdin: typeof hold === "number" ? "null" : "piped",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  if (typeof hold !== "number") {
    const release = () => child.stdin.close().catch(() => {});
    hold.then(release, release);
  }
  const { code: status, stderr } = await deadline(child.output(), "the resetting peers");
  if (status !== 0) {
    throw new Error(`the resetting peers failed: ${new TextDecoder().decode(stderr)}`);
  }
}

/** What a finished `deno run` printed and how it ended. */
export interface Finished {
  /** The exit code. */
  code: number;
  /** What it printed on stdout. */
  stdout: string;
  /** What it printed on stderr. */
  stderr: string;
}

/** How a script is started: its permissions (as its task grants them), a shell prefix, a style. */
export interface RunOptions {
  /** `deno run` permission flags. @default {["--allow-net=127.0.0.1"]} */
  permissions?: string[];
  /** Shell commands to run first, e.g. `ulimit -n 64` (the script then runs under sh). */
  shell?: string;
  /** For main.ts: the server's style, passed as `--style`. */
  style?: Style;
  /** For main.ts: the server's selector, passed as `--selector` (epoll adds `--allow-ffi`). */
  selector?: SelectorName;
  /** Environment variables to add. */
  env?: Record<string, string>;
  /** Without deno.json (`--no-config`): no `"unstable": ["net"]`, as outside this repository. */
  noConfig?: boolean;
  /** Run this task of deno.json instead (`deno task <task> <args>`), with the task's permissions. */
  task?: string;
  /** In a new session and process group (`setsid`), which its pid names: signal it as a terminal does. */
  newSession?: boolean;
}

function usesShell(options: RunOptions): boolean {
  return options.shell !== undefined || options.newSession === true;
}

/** The command for one of the project's scripts, as its task runs it. */
function denoRun(script: string, args: string[], options: RunOptions = {}): Deno.CommandOptions {
  const { permissions = ["--allow-net=127.0.0.1"], shell, style, selector, env, noConfig, task } =
    options;
  const styled = [
    ...args,
    ...(style ? ["--style", style] : []),
    ...(selector ? ["--selector", selector] : []),
  ];
  const granted = selector === "epoll" ? [...permissions, "--allow-ffi"] : permissions;
  const config = noConfig ? ["--no-config"] : [];
  const deno = task
    ? ["task", task, ...styled]
    : ["run", ...config, ...granted, new URL(script, root).pathname, ...styled];
  const exec = options.newSession ? "exec setsid deno" : "exec deno";
  return {
    ...(usesShell(options)
      ? { args: ["-c", `${shell ?? "true"} && ${exec} "$@"`, "sh", ...deno] }
      : { args: deno }),
    cwd: root.pathname,
    env: { NO_COLOR: "1", ...env },
    stdin: "null",
  };
}

/**
 * Runs `deno run --allow-net=127.0.0.1 <script> <args>` to its end.
 *
 * @param script `main.ts` or `client.ts`.
 * @param args Its arguments.
 * @param options Other permissions, or a shell prefix.
 * @returns Its exit code and output.
 */
export async function runScript(
  script: string,
  args: string[],
  options: RunOptions = {},
): Promise<Finished> {
  const { code, stdout, stderr } = await deadline(
    new Deno.Command(usesShell(options) ? "sh" : "deno", denoRun(script, args, options)).output(),
    `deno run ${script} ${args.join(" ")}`,
    30_000,
  );
  const decoder = new TextDecoder();
  return { code, stdout: decoder.decode(stdout), stderr: decoder.decode(stderr) };
}

/**
 * main.ts started as a user would, its output collected as it comes.
 * `await using` stops it at the end of the scope (SIGKILL if it is still
 * running), even when the test fails.
 */
export class ServerProcess implements AsyncDisposable {
  readonly #child: Deno.ChildProcess;
  #stdout = "";
  #stderr = "";
  readonly #done: Promise<void>;
  #changed: () => void = () => {};
  #exited = false;

  private constructor(args: string[], options: RunOptions) {
    this.#child = new Deno.Command(usesShell(options) ? "sh" : "deno", {
      ...denoRun("main.ts", args, options),
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#child.status.then(() => this.#exited = true);
    this.#done = Promise.all([
      this.#collect(this.#child.stdout, (text) => this.#stdout += text),
      this.#collect(this.#child.stderr, (text) => this.#stderr += text),
    ]).then(() => {});
  }

  /**
   * Starts `main.ts <args>` without waiting for anything (for `--quiet`, which
   * prints no listening line).
   *
   * @param args The server's arguments.
   * @param options Other permissions, or a shell prefix.
   * @returns The server, perhaps not yet listening.
   */
  static spawn(args: string[], options: RunOptions = {}): ServerProcess {
    return new ServerProcess(args, options);
  }

  /**
   * Starts `main.ts <args>` and waits for its listening line.
   *
   * @param args The server's arguments.
   * @param options Other permissions, or a shell prefix.
   * @returns The running server.
   */
  static async start(args: string[], options: RunOptions = {}): Promise<ServerProcess> {
    const server = ServerProcess.spawn(args, options);
    try {
      await server.waitFor(/listening on /); // a line of text, or a JSON object
    } catch (error) {
      await server[Symbol.asyncDispose]();
      throw error;
    }
    return server;
  }

  /** Whether the process has exited. */
  get exited(): boolean {
    return this.#exited;
  }

  /** The process id, for signals. */
  get pid(): number {
    return this.#child.pid;
  }

  /** Everything the server printed on stdout so far. */
  get stdout(): string {
    return this.#stdout;
  }

  /** Everything the server printed on stderr so far. */
  get stderr(): string {
    return this.#stderr;
  }

  /**
   * Counts the lines of stdout so far that match.
   *
   * @param pattern What a line must match (tested against each line).
   * @returns How many lines do.
   */
  count(pattern: RegExp): number {
    return this.#stdout.split("\n").filter((line) => pattern.test(line)).length;
  }

  /** The port from its listening line. */
  get port(): number {
    return Number(this.#stdout.match(/listening on [^"\n]*:(\d+)/)?.[1]);
  }

  /** Where it listens, from its listening line. */
  get target(): Target {
    const where = this.#stdout.match(/^listening on (\S+)/m)?.[1] ?? "";
    if (where.startsWith("/")) return { transport: "unix", path: where };
    const [, host, port] = where.match(/^\[?([^\]]*)\]?:(\d+)$/) ?? [];
    return { hostname: host, port: Number(port) };
  }

  /**
   * Waits until the server's stdout matches `pattern`.
   *
   * @param pattern What to wait for.
   * @param ms How long to wait at most.
   * @returns The match.
   */
  async waitFor(pattern: RegExp, ms = STEP_TIMEOUT_MS): Promise<RegExpMatchArray> {
    const end = performance.now() + ms;
    while (true) {
      const match = this.#stdout.match(pattern);
      if (match) return match;
      const left = end - performance.now();
      if (left <= 0 || this.#exited) {
        throw new Error(
          `server output never matched ${pattern}\nstdout: ${this.#stdout}\nstderr: ${this.#stderr}`,
        );
      }
      const changed = new Promise<void>((resolve) => this.#changed = resolve);
      await deadline(Promise.race([changed, this.#done]), "output", left).catch(() => {});
    }
  }

  /** Sends a signal. */
  kill(signal: Deno.Signal): void {
    this.#child.kill(signal);
  }

  /**
   * Sends a signal and waits for the process to end.
   *
   * @param signal The signal; omit to only wait.
   * @param ms How long the process may take to exit.
   * @returns Its exit code and all it printed.
   */
  async stop(signal?: Deno.Signal, ms = STEP_TIMEOUT_MS): Promise<Finished> {
    if (signal) this.#child.kill(signal);
    const { code } = await deadline(this.#child.status, "the server's exit", ms);
    await this.#done;
    return { code, stdout: this.#stdout, stderr: this.#stderr };
  }

  /** Kills the server if it still runs, and waits for it. */
  async [Symbol.asyncDispose](): Promise<void> {
    if (!this.#exited) this.#child.kill("SIGKILL");
    await this.#child.status;
    await this.#done;
  }

  async #collect(stream: ReadableStream<Uint8Array>, add: (text: string) => void) {
    for await (const text of stream.pipeThrough(new TextDecoderStream())) {
      add(text);
      this.#changed();
    }
  }
}

/** A process's open file descriptors and resident memory. */
export interface ProcessUsage {
  /** Open file descriptors. */
  fds: number;
  /** Resident memory (VmRSS) in KiB. */
  rssKiB: number;
  /** CPU time used so far, user and system, in milliseconds. */
  cpuMs: number;
}

/**
 * Reads a process's descriptors and memory from /proc. Deno guards /proc behind
 * --allow-all, so a child `deno eval` (allowed by --allow-run=deno) reads it.
 *
 * @param pid The process; this one by default.
 * @returns Its usage now.
 */
export async function processUsage(pid = Deno.pid): Promise<ProcessUsage> {
  const code = `
    const fds = [...Deno.readDirSync("/proc/${pid}/fd")].length;
    const rss = Deno.readTextFileSync("/proc/${pid}/status").match(/VmRSS:\\s*(\\d+)/)[1];
    // utime and stime: fields 14 and 15, counted after the ")" that ends the name.
    const stat = Deno.readTextFileSync("/proc/${pid}/stat").split(")").pop().trim().split(" ");
    const ticks = Number(stat[11]) + Number(stat[12]); // in 1/100 s on Linux
    console.log(JSON.stringify({ fds, rssKiB: Number(rss), cpuMs: ticks * 10 }));`;
  const { code: exit, stdout, stderr } = await deadline(
    new Deno.Command("deno", { args: ["eval", code] }).output(),
    `reading /proc/${pid}`,
  );
  const decoder = new TextDecoder();
  if (exit !== 0) throw new Error(`cannot read /proc/${pid}: ${decoder.decode(stderr)}`);
  return JSON.parse(decoder.decode(stdout));
}
