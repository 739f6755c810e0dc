/**
 * Stand-in for the part of `@std/assert` the tests use, for machines that
 * cannot reach JSR (see testing/run_tests.ts). Written for this project; the
 * real package is used wherever it can be fetched. Same names, same meaning.
 *
 * @module
 */

/** Thrown when an assertion fails. */
export class AssertionError extends Error {
  override name = "AssertionError";
}

/** Fails unless `expr` is truthy. */
export function assert(expr: unknown, msg = "Expected expression to be truthy"): asserts expr {
  if (!expr) throw new AssertionError(msg);
}

/**
 * Fails unless `actual` and `expected` are deeply equal: primitives, arrays,
 * plain objects, typed arrays, Dates, Sets, Maps and Errors. Throws a
 * TypeError for other kinds of objects, which only the real package compares.
 */
export function assertEquals<T>(actual: T, expected: T, msg?: string): void {
  const difference = differ(actual, expected, "value");
  if (difference) throw new AssertionError(msg ? `${msg}: ${difference}` : difference);
}

/** Fails unless `actual` matches `expected`. */
export function assertMatch(actual: string, expected: RegExp, msg?: string): void {
  if (!expected.test(actual)) {
    throw new AssertionError(msg ?? `Expected ${JSON.stringify(actual)} to match ${expected}`);
  }
}

/** Fails unless `actual` contains `expected`. */
export function assertStringIncludes(actual: string, expected: string, msg?: string): void {
  if (!actual.includes(expected)) {
    throw new AssertionError(
      msg ?? `Expected ${JSON.stringify(actual)} to include ${JSON.stringify(expected)}`,
    );
  }
}

/** Fails unless `actual <= expected`. */
export function assertLessOrEqual<T>(actual: T, expected: T, msg?: string): void {
  if (!(actual <= expected)) {
    throw new AssertionError(msg ?? `Expected ${actual} to be less than or equal to ${expected}`);
  }
}

/** Fails unless `actual < expected`. */
export function assertLess<T>(actual: T, expected: T, msg?: string): void {
  if (!(actual < expected)) {
    throw new AssertionError(msg ?? `Expected ${actual} to be less than ${expected}`);
  }
}

/** Fails unless `actual > expected`. */
export function assertGreater<T>(actual: T, expected: T, msg?: string): void {
  if (!(actual > expected)) {
    throw new AssertionError(msg ?? `Expected ${actual} to be greater than ${expected}`);
  }
}

// deno-lint-ignore no-explicit-any
type ErrorClass<E extends Error = Error> = abstract new (...args: any[]) => E;

/** Fails unless `fn` throws an `ErrorClass` (whose message includes `msgIncludes`). */
export function assertThrows<E extends Error = Error>(
  fn: () => unknown,
  ErrorClass?: ErrorClass<E>,
  msgIncludes?: string,
): E {
  try {
    fn();
  } catch (error) {
    return checkError(error, ErrorClass, msgIncludes);
  }
  throw new AssertionError("Expected function to throw");
}

/** Fails unless the promise from `fn` rejects with an `ErrorClass` (whose message includes `msgIncludes`). */
export async function assertRejects<E extends Error = Error>(
  fn: () => PromiseLike<unknown>,
  ErrorClass?: ErrorClass<E>,
  msgIncludes?: string,
): Promise<E> {
  let promise: PromiseLike<unknown>;
  try {
    promise = fn();
  } catch {
    throw new AssertionError("Function throws when expected to reject");
  }
  try {
    await promise;
  } catch (error) {
    return checkError(error, ErrorClass, msgIncludes);
  }
  throw new AssertionError("Expected function to reject");
}

function checkError<E extends Error>(
  error: unknown,
  ErrorClass?: ErrorClass<E>,
  msgIncludes?: string,
): E {
  if (ErrorClass && !(error instanceof ErrorClass)) {
    throw new AssertionError(`Expected error to be instance of "${ErrorClass.name}", got ${error}`);
  }
  if (msgIncludes !== undefined && !String((error as Error)?.message).includes(msgIncludes)) {
    throw new AssertionError(
      `Expected error message to include ${JSON.stringify(msgIncludes)}, got ${error}`,
    );
  }
  return error as E;
}

/**
 * Where two values first differ, as a sentence, or "" if they are deeply equal,
 * with the real assertEquals's meaning: the same prototype, then the same
 * contents (array and object entries, typed-array elements, Set members, Map
 * entries, an Error's name, message, cause and stack, a Date's time). Other kinds of
 * objects are refused rather than compared wrongly.
 */
function differ(actual: unknown, expected: unknown, path: string): string {
  if (Object.is(actual, expected) || actual === expected) return "";
  const shown = (value: unknown) => Deno.inspect(value, { depth: 2 });
  const unlike = `${path}: expected ${shown(expected)}, got ${shown(actual)}`;
  if (
    typeof actual !== "object" || typeof expected !== "object" || actual === null ||
    expected === null || Object.getPrototypeOf(actual) !== Object.getPrototypeOf(expected)
  ) {
    return unlike;
  }
  if (ArrayBuffer.isView(actual)) {
    const a = actual as unknown as ArrayLike<unknown>;
    const b = expected as unknown as ArrayLike<unknown>;
    if (a.length !== b.length) return `${path}: expected length ${b.length}, got ${a.length}`;
    for (let i = 0; i < a.length; i++) {
      if (!Object.is(a[i], b[i])) return `${path}[${i}]: expected ${b[i]}, got ${a[i]}`;
    }
    return "";
  }
  if (actual instanceof Date) {
    return Object.is(actual.getTime(), (expected as Date).getTime()) ? "" : unlike;
  }
  if (actual instanceof Set) return differentSets(actual, expected as Set<unknown>) ? unlike : "";
  if (actual instanceof Map) {
    return differentMaps(actual, expected as Map<unknown, unknown>, unlike);
  }
  if (actual instanceof Error) {
    for (const field of ["name", "message", "cause", "stack"] as const) {
      const difference = differ(actual[field], (expected as Error)[field], `${path}.${field}`);
      if (difference) return difference;
    }
  } else if (!isPlain(actual)) {
    throw new TypeError(
      `the offline stand-in for assertEquals cannot compare ${
        shown(actual)
      }: use the real @std/assert`,
    );
  }
  const keys = new Set([...Object.keys(actual), ...Object.keys(expected)]);
  if (Array.isArray(actual)) keys.add("length");
  for (const key of keys) {
    if (Object.hasOwn(actual, key) !== Object.hasOwn(expected, key) && key !== "length") {
      return `${path}.${key}: present on one side only`;
    }
    const difference = differ(
      (actual as Record<string, unknown>)[key],
      (expected as Record<string, unknown>)[key],
      `${path}.${key}`,
    );
    if (difference) return difference;
  }
  return "";
}

/** Plain objects and arrays: compared by their own enumerable entries. */
function isPlain(value: object): boolean {
  const prototype = Object.getPrototypeOf(value);
  return prototype === null || prototype === Object.prototype || prototype === Array.prototype;
}

/** Sets differ unless every member of one has a deeply equal member in the other. */
function differentSets(a: Set<unknown>, b: Set<unknown>): boolean {
  if (a.size !== b.size) return true;
  const unmatched = [...b];
  for (const member of a) {
    const i = unmatched.findIndex((other) => differ(member, other, "") === "");
    if (i < 0) return true;
    unmatched.splice(i, 1);
  }
  return false;
}

/** Maps differ unless every entry of one has an entry with deeply equal key and value in the other. */
function differentMaps(a: Map<unknown, unknown>, b: Map<unknown, unknown>, unlike: string): string {
  if (a.size !== b.size) return unlike;
  const unmatched = [...b];
  for (const [key, value] of a) {
    const i = unmatched.findIndex(([otherKey, otherValue]) =>
      differ(key, otherKey, "") === "" && differ(value, otherValue, "") === ""
    );
    if (i < 0) return unlike;
    unmatched.splice(i, 1);
  }
  return "";
}
