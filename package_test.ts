// The package as a user meets it: the README's import example, run against this
// checkout through the package's own exports (testing/reuse/deno.json links it).
import { assert, assertEquals, assertMatch } from "@std/assert";
import { deadline, runScript, ServerProcess } from "./testing/helpers.ts";

const root = new URL("./", import.meta.url);

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

/** Runs deno with `args` in the repository: what it wrote on stdout and stderr, or a failure. */
async function deno(...args: string[]): Promise<{ stdout: string; stderr: string }> {
  const { code, stdout, stderr } = await new Deno.Command("deno", {
    args,
    cwd: root.pathname,
    env: { NO_COLOR: "1" },
  }).output();
  const decoder = new TextDecoder();
  const output = { stdout: decoder.decode(stdout), stderr: decoder.decode(stderr) };
  assertEquals(code, 0, `deno ${args.join(" ")}:\n${output.stderr}`);
  return output;
}

Deno.test("the package's exports pass deno doc --lint on their own, as JSR checks them", async () => {
  const { exports } = JSON.parse(await Deno.readTextFile(new URL("deno.json", root)));
  await deno("doc", "--lint", ...Object.values(exports as Record<string, string>));
});

Deno.test("what JSR would publish: every import of a published module, every link and image of a published page, is published too", async () => {
  const { stdout, stderr } = await deno("publish", "--dry-run", "--allow-dirty");
  const listing = stdout + stderr;
  const published = new Set(
    [...listing.matchAll(/^\s+(file:\/\/\S+) \(/gm)].map(([, url]) => url),
  );
  assert(published.has(new URL("README.md", root).href), listing);
  const missing: string[] = [];
  for (const file of published) {
    if (file.endsWith(".ts")) {
      const graph = await deno("info", "--json", new URL(file).pathname);
      const { modules } = JSON.parse(graph.stdout);
      for (const { specifier } of modules as { specifier: string }[]) {
        if (specifier.startsWith("file:") && !published.has(specifier)) {
          missing.push(`${file} imports ${specifier}`);
        }
      }
    } else if (file.endsWith(".md")) {
      const text = await Deno.readTextFile(new URL(file));
      for (const [, link] of text.matchAll(/\]\(([^)\s#]+)[^)]*\)/g)) {
        if (/^[a-z]+:/.test(link)) continue;
        const target = new URL(link, file).href;
        if (!published.has(target)) missing.push(`${file} links to ${target}`);
      }
    }
  }
  const relative = missing.map((line) => line.replaceAll(root.href, ""));
  assertEquals(relative, [], relative.join("\n"));
});

Deno.test("deno.json's tasks take their grants from its permission sets; only start:workers adds one", async () => {
  const { tasks } = JSON.parse(await Deno.readTextFile(new URL("deno.json", root)));
  const runs = Object.entries(tasks as Record<string, { command: string }>)
    .filter(([, task]) => task.command.startsWith("deno run "));
  assert(runs.length >= 8, "the tasks that run a script");
  for (const [name, { command }] of runs) {
    assertMatch(command, /^deno run -P(=[a-z]+)? /, name);
    const flags = command.match(/--allow-[a-z]+\S*/g) ?? [];
    // --workers starts this Deno again: the run grant names its path, which no set can.
    const expected = name === "start:workers" ? [`--allow-run="$(deno`] : [];
    assertEquals(flags, expected, name);
  }
});

Deno.test("deno task start grants what its set says: 127.0.0.1, and no more", async () => {
  await using server = await ServerProcess.start(["--port", "0"], { task: "start" });
  assertMatch(server.stdout, /^listening on 127\.0\.0\.1:\d+$/m);
  assertEquals((await server.stop("SIGTERM")).code, 0);
  const refused = [
    [["--host", "::1"], "no permission to listen on [::1]:0: run with --allow-net=[::1]"],
    [["--workers", "2"], "--workers starts its workers with this Deno: add --allow-run="],
    [["--selector", "epoll"], "--selector epoll calls the C library: add --allow-ffi"],
  ];
  for (const [args, message] of refused) {
    const { code, stderr } = await runScript("main.ts", [...args, "--port", "0"], {
      task: "start",
    });
    assertEquals(code, 1, stderr);
    assert(stderr.includes(`main.ts: ${message}`), stderr);
  }
});

Deno.test("a bare deno test is told to add -P, which grants the suite's set", async () => {
  const { code, stderr } = await new Deno.Command("deno", {
    args: ["test", "--no-run", "package_test.ts"],
    cwd: root.pathname,
    env: { NO_COLOR: "1" },
  }).output();
  assertEquals(code, 1);
  assertMatch(new TextDecoder().decode(stderr), /Did you mean to run with `-P`/);
});
