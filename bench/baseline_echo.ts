/**
 * The baseline for `deno task bench`: the echo server most Deno programs would
 * write, one async loop per connection reading into a 32 KiB buffer and writing
 * every byte back. It has no limits, no backpressure beyond its own loop, and
 * no shutdown; it is here only to be measured against.
 *
 * Usage: deno run --allow-net=127.0.0.1 bench/baseline_echo.ts PORT
 *
 * @module
 */

async function echo(conn: Deno.TcpConn): Promise<void> {
  conn.setNoDelay(true);
  const buffer = new Uint8Array(32 * 1024);
  try {
    for (let n; (n = await conn.read(buffer)) !== null;) {
      for (let written = 0; written < n;) written += await conn.write(buffer.subarray(written, n));
    }
  } catch {
    // a reset or broken pipe ends this connection only
  } finally {
    conn.close();
  }
}

const listener = Deno.listen({ hostname: "127.0.0.1", port: Number(Deno.args[0]) });
console.log(`listening on 127.0.0.1:${listener.addr.port}`);
for await (const conn of listener) echo(conn);
