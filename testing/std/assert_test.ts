// The offline stand-in must fail wherever the real assertEquals fails: a
// stand-in that calls different values equal hides broken code.
import { assertEquals, AssertionError } from "./assert.ts";

/** How assertEquals(actual, expected) ends: "equal", or the error's class name. */
function outcome(actual: unknown, expected: unknown): string {
  try {
    assertEquals(actual, expected);
    return "equal";
  } catch (error) {
    return error instanceof AssertionError ? "differ" : (error as Error).name;
  }
}

function check(cases: [unknown, unknown, string][]): void {
  for (const [actual, expected, want] of cases) {
    const got = outcome(actual, expected);
    if (got !== want) {
      throw new Error(`${Deno.inspect(actual)} vs ${Deno.inspect(expected)}: ${got}, not ${want}`);
    }
  }
}

Deno.test("the assertEquals stand-in tells Sets and Maps apart by their contents", () => {
  check([
    [new Set([1, 2]), new Set([2, 1]), "equal"],
    [new Set([1, 2]), new Set([1, 3]), "differ"],
    [new Set([1]), new Set([1, 2]), "differ"],
    [new Set([{ a: 1 }]), new Set([{ a: 1 }]), "equal"],
    [new Set([{ a: 1 }]), new Set([{ a: 2 }]), "differ"],
    [new Map([["a", 1]]), new Map([["a", 1]]), "equal"],
    [new Map([["a", 1]]), new Map([["a", 2]]), "differ"],
    [new Map([["a", 1]]), new Map([["b", 1]]), "differ"],
    [new Map(), new Set(), "differ"],
    [{ s: new Set([1]) }, { s: new Set([2]) }, "differ"],
  ]);
});

Deno.test("the assertEquals stand-in tells Errors apart", () => {
  const error = new RangeError("out");
  check([
    [error, error, "equal"],
    [new RangeError("out"), new RangeError("other"), "differ"],
    [new RangeError("out"), new TypeError("out"), "differ"],
    [new Error("a", { cause: 1 }), new Error("a", { cause: 2 }), "differ"],
  ]);
});

Deno.test("the assertEquals stand-in compares arrays, objects, bytes and dates", () => {
  check([
    [[1, [2, 3]], [1, [2, 3]], "equal"],
    [[1, 2], [1, 2, 3], "differ"],
    [{ a: 1, b: undefined }, { a: 1 }, "differ"],
    [new Uint8Array([1, 2]), new Uint8Array([1, 2]), "equal"],
    [new Uint8Array([1, 2]), new Uint8Array([1, 3]), "differ"],
    [new Uint8Array([1]), new Uint16Array([1]), "differ"],
    [new Date(0), new Date(0), "equal"],
    [new Date(0), new Date(1), "differ"],
    [NaN, NaN, "equal"],
  ]);
});

Deno.test("the assertEquals stand-in refuses kinds of objects it cannot compare", () => {
  check([[new URL("http://a/"), new URL("http://b/"), "TypeError"]]);
});
