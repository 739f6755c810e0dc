/**
 * Test helpers: run main.ts and client.ts as a user would, and move bytes
 * over a connection exactly.
 *
 * @module
 */

const root = new URL("../", import.meta.url);

/** What a finished `deno run` printed and how it ended. */
export interface Finished {
  code: number;
  stdout: string;
  stderr: string;
}

/** How a script is started: its permissions (as its task grants them), or a shell prefix. */
export interface RunOptions {
  /** `deno run` permission flags. @default {["--allow-net=127.0.0.1"]} */
  permissions?: string[];
  /** Shell commands to run first, e.g. `ulimit -n 64` (the script then runs under sh). */
  shell?: string;
}

/** The command for one of the project's scripts, as its task runs it. */
function denoRun(script: string, args: string[], options: RunOptions = {}): Deno.CommandOptions {
  const { permissions = ["--allow-net=127.0.0.1"], shell } = options;
  const deno = ["run", ...permissions, new URL(script, root).pathname, ...args];
  return {
    ...(shell ? { args: ["-c", `${shell} && exec deno "$@"`, "sh", ...deno] } : { args: deno }),
    cwd: root.pathname,
    env: { NO_COLOR: "1" },
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
  const { code, stdout, stderr } = await new Deno.Command(
    options.shell ? "sh" : "deno",
    denoRun(script, args, options),
  ).output();
  const decoder = new TextDecoder();
  return { code, stdout: decoder.decode(stdout), stderr: decoder.decode(stderr) };
}

/** main.ts started as a user would, its output collected as it comes. */
export class ServerProcess {
  readonly #child: Deno.ChildProcess;
  #stdout = "";
  #stderr = "";
  readonly #done: Promise<void>;
  #changed: () => void = () => {};

  private constructor(args: string[], options: RunOptions) {
    this.#child = new Deno.Command(options.shell ? "sh" : "deno", {
      ...denoRun("main.ts", args, options),
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#done = Promise.all([
      this.#collect(this.#child.stdout, (text) => this.#stdout += text),
      this.#collect(this.#child.stderr, (text) => this.#stderr += text),
    ]).then(() => {});
  }

  /**
   * Starts `main.ts <args>` and waits for its listening line.
   *
   * @param args The server's arguments.
   * @param options Other permissions, or a shell prefix.
   * @returns The running server.
   */
  static async start(args: string[], options: RunOptions = {}): Promise<ServerProcess> {
    const server = new ServerProcess(args, options);
    await server.waitFor(/^listening on /m);
    return server;
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

  /** The port from its listening line. */
  get port(): number {
    return Number(this.#stdout.match(/^listening on .*:(\d+)/m)?.[1]);
  }

  /**
   * Waits until the server's stdout matches `pattern`.
   *
   * @param pattern What to wait for.
   * @param timeout Milliseconds to wait at most.
   * @returns The match.
   */
  async waitFor(pattern: RegExp, timeout = 10_000): Promise<RegExpMatchArray> {
    const deadline = performance.now() + timeout;
    while (true) {
      const match = this.#stdout.match(pattern);
      if (match) return match;
      const left = deadline - performance.now();
      if (left <= 0) {
        throw new Error(
          `server output never matched ${pattern}\nstdout: ${this.#stdout}\nstderr: ${this.#stderr}`,
        );
      }
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        new Promise<void>((resolve) => this.#changed = resolve),
        new Promise<void>((resolve) => timer = setTimeout(resolve, left)),
        this.#done,
      ]);
      clearTimeout(timer);
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
   * @returns Its exit code and all it printed.
   */
  async stop(signal?: Deno.Signal): Promise<Finished> {
    if (signal) this.#child.kill(signal);
    const { code } = await this.#child.status;
    await this.#done;
    return { code, stdout: this.#stdout, stderr: this.#stderr };
  }

  async #collect(stream: ReadableStream<Uint8Array>, add: (text: string) => void) {
    for await (const text of stream.pipeThrough(new TextDecoderStream())) {
      add(text);
      this.#changed();
    }
  }
}

/** Writes all of `bytes` to `conn`. */
export async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let sent = 0; sent < bytes.length;) sent += await conn.write(bytes.subarray(sent));
}

/** Reads until EOF, or until `limit` bytes came. */
export async function readAll(conn: Deno.Conn, limit = Infinity): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  let total = 0;
  const buffer = new Uint8Array(64 * 1024);
  while (total < limit) {
    const n = await conn.read(buffer.subarray(0, Math.min(buffer.length, limit - total)));
    if (n === null) break;
    chunks.push(buffer.slice(0, n));
    total += n;
  }
  const all = new Uint8Array(total);
  let offset = 0;
  for (const chunk of chunks) {
    all.set(chunk, offset);
    offset += chunk.length;
  }
  return all;
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

/** Resolves after `ms` milliseconds. */
export function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A process's open file descriptors and resident memory. */
export interface ProcessUsage {
  fds: number;
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
  const { code: exit, stdout, stderr } = await new Deno.Command("deno", {
    args: ["eval", code],
  }).output();
  const decoder = new TextDecoder();
  if (exit !== 0) throw new Error(`cannot read /proc/${pid}: ${decoder.decode(stderr)}`);
  return JSON.parse(decoder.decode(stdout));
}
