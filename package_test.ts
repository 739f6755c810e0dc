// The package as a user meets it: the README's import example, run against this
// checkout through the package's own exports (testing/reuse/deno.json links it).
import { assertEquals } from "@std/assert";
import { deadline } from "./testing/helpers.ts";

Deno.test("the README's import example runs, importing loop.ts through the package's exports", async () => {
  const readme = await Deno.readTextFile(new URL("README.md", import.meta.url));
  const example = readme.match(/^\/\/ accept\.ts:.*\n[^]*?^await serving;$/m)?.[0];
  assertEquals(typeof example, "string", "the accept.ts example in README.md");
  const config = new URL("testing/reuse/deno.json", import.meta.url).pathname;
  const child = new Deno.Command("deno", {
    args: ["run", "--allow-net=127.0.0.1", `--config=${config}`, "-"],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stdin = child.stdin.getWriter();
  await stdin.write(new TextEncoder().encode(example));
  await stdin.close();
  const { code, stdout, stderr } = await deadline(child.output(), "the README example", 30_000);
  const decoder = new TextDecoder();
  assertEquals([code, decoder.decode(stdout), decoder.decode(stderr)], [
    0,
    "accepted one connection\n",
    "",
  ]);
});
