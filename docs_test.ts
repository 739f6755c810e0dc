// The documentation as a reader meets it: every relative link leads to a file of this
// repository, and nothing points at tools outside it.
import { assertEquals } from "@std/assert";

const root = new URL("./", import.meta.url);

/** Every file of the repository, as a path relative to its root (not .git, coverage/ or sockets). */
function* files(dir = ""): Generator<string> {
  for (const entry of Deno.readDirSync(new URL(dir || ".", root))) {
    const path = dir + entry.name;
    if ([".git", "coverage", "node_modules"].includes(entry.name)) continue;
    if (entry.isDirectory) yield* files(`${path}/`);
    else if (entry.isFile) yield path;
  }
}

function exists(path: string): boolean {
  try {
    Deno.statSync(new URL(path, root));
    return true;
  } catch {
    return false;
  }
}

Deno.test("every relative link in the Markdown files leads to a file of the repository", () => {
  const broken: string[] = [];
  for (const file of files()) {
    if (!file.endsWith(".md")) continue;
    const text = Deno.readTextFileSync(new URL(file, root));
    for (const [, link] of text.matchAll(/\]\(([^)\s]+)\)/g)) {
      if (/^[a-z]+:/.test(link) || link.startsWith("#")) continue;
      const target = new URL(link.split("#")[0], new URL(file, root));
      const inside = target.href.startsWith(root.href);
      if (!inside || !exists(target.pathname)) broken.push(`${file}: ${link}`);
    }
  }
  assertEquals(broken, []);
});

Deno.test("no file points at tools beside the repository that its users do not have", () => {
  const shared = ["..", "shared"].join("/"); // written so, this file does not point at it
  const outside = [...files()].filter((file) =>
    !file.startsWith(".ci/") && /\.(md|ts|json|cfg|sh)$/.test(file) &&
    Deno.readTextFileSync(new URL(file, root)).includes(shared)
  );
  assertEquals(outside, []);
});
