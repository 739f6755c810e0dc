// Resolves the real @std packages: `deno install --entrypoint` on this file
// succeeds only where JSR can be reached or the packages are cached.
import "@std/assert";
import "@std/net";
