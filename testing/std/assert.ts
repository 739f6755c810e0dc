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

/** Fails unless `actual` and `expected` are deeply equal (arrays, typed arrays, plain objects). */
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

/** Where two values first differ, as a sentence, or "" if they are deeply equal. */
function differ(actual: unknown, expected: unknown, path: string): string {
  if (Object.is(actual, expected)) return "";
  const shown = (value: unknown) => Deno.inspect(value, { depth: 2 });
  if (
    typeof actual !== "object" || typeof expected !== "object" || actual === null ||
    expected === null || Object.getPrototypeOf(actual) !== Object.getPrototypeOf(expected)
  ) {
    return `${path}: expected ${shown(expected)}, got ${shown(actual)}`;
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
  const keys = new Set([...Object.keys(actual), ...Object.keys(expected)]);
  if (Array.isArray(actual)) keys.add("length");
  for (const key of keys) {
    const difference = differ(
      (actual as Record<string, unknown>)[key],
      (expected as Record<string, unknown>)[key],
      `${path}.${key}`,
    );
    if (difference) return difference;
  }
  return "";
}
