/**
 * A typed client for the Todo API, for the Next.js frontend's lib/api.ts.
 *
 * Every request and response type is derived from ./schema.ts, which is generated from the
 * service's OpenAPI schema (clients/typescript/sync.sh); CI fails when they drift, and the
 * type assertions at the bottom fail to compile if an operation stops matching this client.
 *
 *   const api = createTodoApi({
 *     baseUrl: process.env.NEXT_PUBLIC_API_URL!,
 *     // Better Auth's jwt() plugin, with jwtClient() on the auth client:
 *     getToken: async () => (await authClient.token()).data!.token,
 *   });
 *   const tasks = await api.listTasks(session.user.id, "pending");
 *
 * Safe retries: every write carries an `Idempotency-Key` (a fresh UUID per call), and a 503,
 * a 409 (the same key still in flight) or a network failure is retried with the same key,
 * after `Retry-After` or a capped exponential backoff, a bounded number of times. A write the
 * server stored before the connection died is answered from its record, never done twice.
 *
 * Concurrent edits: `etagOf(task)` is the tag the server sent with a task; pass it back as
 * `{ ifMatch }` and a write made from a stale copy fails with a 412 instead of overwriting
 * someone else's change. `{ cached }` on a read sends `If-None-Match` and resolves to the
 * cached object itself while it is still current (304).
 */
import type { components, paths } from "./schema";

type Method = "get" | "post" | "put" | "patch" | "delete";
type Operation<P extends keyof paths, M extends Method> = NonNullable<paths[P][M]>;
type JsonOf<R> = R extends { content: { "application/json": infer T } } ? T : never;
type Success<P extends keyof paths, M extends Method, S extends number> =
  Operation<P, M> extends { responses: infer R } ? (S extends keyof R ? JsonOf<R[S]> : never) : never;
type RequestJson<P extends keyof paths, M extends Method> =
  Operation<P, M> extends { requestBody: { content: { "application/json": infer B } } }
    ? B
    : Operation<P, M> extends { requestBody?: { content: { "application/json": infer B } } }
      ? B
      : never;
type QueryOf<P extends keyof paths, M extends Method> =
  Operation<P, M> extends { parameters: { query?: infer Q } } ? NonNullable<Q> : never;

const TASKS = "/api/{user_id}/tasks";
const TASK = "/api/{user_id}/tasks/{task_id}";
const TOGGLE = "/api/{user_id}/tasks/{task_id}/complete";
type Tasks = typeof TASKS;
type OneTask = typeof TASK;
type Toggle = typeof TOGGLE;

/** A task as the API returns it (`created_at`/`updated_at` are ISO 8601 strings, UTC). */
export type Task = components["schemas"]["TaskRead"];
export type TaskCreate = RequestJson<Tasks, "post">;
export type TaskReplace = RequestJson<OneTask, "put">;
export type TaskPatch = RequestJson<OneTask, "patch">;
export type StatusFilter = NonNullable<QueryOf<Tasks, "get">["status"]>;
/** `detail` of a 422: one entry per problem, `loc` naming the field (e.g. ["body", "title"]). */
export interface ValidationProblem {
  type: string;
  loc: (string | number)[];
  msg: string;
}

/**
 * Any non-2xx answer (after the client's own retries). `status` tells what to do:
 * 400 a malformed Idempotency-Key, 401 sign in again (token missing, invalid or expired;
 * refresh it and retry once), 403 the path's user is not the token's, 404 no such task (or
 * not yours), 409 the same Idempotency-Key is still in flight, 412 the task changed since
 * its ETag was read (get it again), 413 body too large, 422 invalid input (`problems`) or an
 * Idempotency-Key reused for another request, 503 retry after `retryAfter` seconds.
 */
export class ApiError extends Error {
  readonly status: number;
  readonly detail: string | ValidationProblem[];
  readonly problems: ValidationProblem[];
  readonly retryAfter: number | null;
  readonly requestId: string | null;

  constructor(status: number, detail: string | ValidationProblem[], headers: Headers) {
    super(typeof detail === "string" ? detail : detail.map((p) => p.msg).join("; "));
    this.name = "ApiError";
    this.status = status;
    this.detail = detail;
    this.problems = Array.isArray(detail) ? detail : [];
    const retry = headers.get("Retry-After");
    this.retryAfter = retry === null ? null : Number(retry);
    this.requestId = headers.get("X-Request-ID");
  }
}

export interface TodoApiOptions {
  /** Where the API is, e.g. https://api.example.com (no trailing slash needed). */
  baseUrl: string;
  /** The bearer token for each request: a Better Auth JWT (see the README's frontend section). */
  getToken: () => string | Promise<string>;
  /** Defaults to the global fetch. */
  fetch?: typeof fetch;
  /** How hard to retry 503s, 409s and network failures (writes keep their Idempotency-Key). */
  retry?: RetryOptions;
}

export interface RetryOptions {
  /** Tries in all, the first included; default 5. 1 turns retrying off. */
  attempts?: number;
  /** The first backoff, doubled each time; default 250 ms. */
  baseDelayMs?: number;
  /** No wait is longer, `Retry-After` included; default 8000 ms. */
  maxDelayMs?: number;
  /** Defaults to setTimeout; tests pass their own. */
  sleep?: (ms: number) => Promise<void>;
}

/** Per call: conditions on the task, or a key of your own (to retry across page loads). */
export interface WriteOptions {
  /** The ETag the change was made from (`etagOf(task)`), or "*": 412 if it is not current. */
  ifMatch?: string | null | undefined;
  /** Defaults to a fresh `crypto.randomUUID()` per call, reused by its retries. */
  idempotencyKey?: string | undefined;
}

/** Per read: the copy you hold; resolves to that same object while it is current (304). */
export interface ReadOptions<T> {
  cached?: T | null | undefined;
}

interface ResponseInfo {
  etag: string | null;
  replayed: boolean;
}
const responseInfo = new WeakMap<object, ResponseInfo>();

/** The ETag the server sent with this task (or list), for `ifMatch` and `cached`. */
export function etagOf(value: object | null | undefined): string | null {
  return (value && responseInfo.get(value)?.etag) ?? null;
}

/** Whether this answer was the server's stored answer to an earlier try of the same write. */
export function wasReplayed(value: object): boolean {
  return responseInfo.get(value)?.replayed ?? false;
}

type TaskList = Success<Tasks, "get", 200>;

export interface TodoApi {
  listTasks(
    userId: string,
    status?: StatusFilter,
    options?: ReadOptions<TaskList>,
  ): Promise<TaskList>;
  createTask(
    userId: string,
    task: TaskCreate,
    options?: Pick<WriteOptions, "idempotencyKey">,
  ): Promise<Success<Tasks, "post", 201>>;
  getTask(
    userId: string,
    taskId: number,
    options?: ReadOptions<Task>,
  ): Promise<Success<OneTask, "get", 200>>;
  /** PUT: `title` required; fields left out keep their value. */
  replaceTask(
    userId: string,
    taskId: number,
    task: TaskReplace,
    options?: WriteOptions,
  ): Promise<Success<OneTask, "put", 200>>;
  /** PATCH: any subset; `description: null` clears it. */
  updateTask(
    userId: string,
    taskId: number,
    changes: TaskPatch,
    options?: WriteOptions,
  ): Promise<Success<OneTask, "patch", 200>>;
  /** Resolves to the task as it was before deletion. */
  deleteTask(
    userId: string,
    taskId: number,
    options?: WriteOptions,
  ): Promise<Success<OneTask, "delete", 200>>;
  toggleTask(
    userId: string,
    taskId: number,
    options?: WriteOptions,
  ): Promise<Success<Toggle, "patch", 200>>;
}

const RETRIED_STATUSES = new Set([409, 503]);

/** The wait before try number `attempt + 1`: the server's `Retry-After` when it gave one,
 * else exponential backoff with full jitter; never above `maxDelayMs`. */
export function retryDelayMs(
  attempt: number,
  retryAfter: string | null,
  baseDelayMs: number,
  maxDelayMs: number,
): number {
  const seconds = retryAfter === null ? NaN : Number(retryAfter);
  if (Number.isFinite(seconds) && seconds >= 0) return Math.min(seconds * 1000, maxDelayMs);
  return Math.min(baseDelayMs * 2 ** attempt, maxDelayMs) * (0.5 + Math.random() / 2);
}

export function createTodoApi(options: TodoApiOptions): TodoApi {
  const base = options.baseUrl.replace(/\/+$/, "");
  const doFetch = options.fetch ?? fetch;
  const attempts = Math.max(1, options.retry?.attempts ?? 5);
  const baseDelayMs = options.retry?.baseDelayMs ?? 250;
  const maxDelayMs = options.retry?.maxDelayMs ?? 8000;
  const sleep =
    options.retry?.sleep ?? ((ms: number) => new Promise<void>((r) => setTimeout(r, ms)));

  interface Call {
    body?: unknown;
    query?: Record<string, string> | undefined;
    write?: WriteOptions;
    cached?: object | null | undefined;
  }

  async function request<T>(method: string, path: string, call: Call = {}): Promise<T> {
    const { body, query, write, cached } = call;
    const url = new URL(base + path);
    for (const [key, value] of Object.entries(query ?? {})) url.searchParams.set(key, value);
    const conditions: Record<string, string> = { Accept: "application/json" };
    if (body !== undefined) conditions["Content-Type"] = "application/json";
    if (write !== undefined) {
      // One key per call, the same for each of its tries: that is what makes them safe.
      conditions["Idempotency-Key"] = write.idempotencyKey ?? crypto.randomUUID();
      if (write.ifMatch) conditions["If-Match"] = write.ifMatch;
    }
    const cachedTag = etagOf(cached);
    if (cachedTag !== null) conditions["If-None-Match"] = cachedTag;
    const init: RequestInit = { method };
    if (body !== undefined) init.body = JSON.stringify(body);

    for (let attempt = 0; ; attempt++) {
      let response: Response;
      // Outside the try: a token that could not be had is the caller's failure, not retried.
      const headers = { ...conditions, Authorization: `Bearer ${await options.getToken()}` };
      try {
        response = await doFetch(url, { ...init, headers });
      } catch (error) {
        // The request may or may not have reached the server: with its key, asking again is
        // safe either way. (fetch rejects with a TypeError on network failures.)
        if (!(error instanceof TypeError) || attempt + 1 >= attempts) throw error;
        await sleep(retryDelayMs(attempt, null, baseDelayMs, maxDelayMs));
        continue;
      }
      if (RETRIED_STATUSES.has(response.status) && attempt + 1 < attempts) {
        await response.body?.cancel();
        const retryAfter = response.headers.get("Retry-After");
        await sleep(retryDelayMs(attempt, retryAfter, baseDelayMs, maxDelayMs));
        continue;
      }
      if (response.status === 304 && cached) return cached as T;
      const payload: unknown = await response.json().catch(() => null);
      if (!response.ok) {
        const detail =
          payload !== null && typeof payload === "object" && "detail" in payload
            ? (payload as { detail: string | ValidationProblem[] }).detail
            : response.statusText || `HTTP ${response.status}`;
        throw new ApiError(response.status, detail, response.headers);
      }
      if (payload !== null && typeof payload === "object") {
        responseInfo.set(payload, {
          etag: response.headers.get("ETag"),
          replayed: response.headers.get("Idempotent-Replayed") === "true",
        });
      }
      return payload as T;
    }
  }

  const tasks = (userId: string) => `/api/${encodeURIComponent(userId)}/tasks`;
  const task = (userId: string, taskId: number) => `${tasks(userId)}/${taskId}`;

  return {
    listTasks: (userId, status, read) =>
      request("GET", tasks(userId), {
        query: status === undefined ? undefined : { status },
        cached: read?.cached,
      }),
    createTask: (userId, body, write) =>
      request("POST", tasks(userId), { body, write: { ...write } }),
    getTask: (userId, taskId, read) =>
      request("GET", task(userId, taskId), { cached: read?.cached }),
    replaceTask: (userId, taskId, body, write) =>
      request("PUT", task(userId, taskId), { body, write: { ...write } }),
    updateTask: (userId, taskId, body, write) =>
      request("PATCH", task(userId, taskId), { body, write: { ...write } }),
    deleteTask: (userId, taskId, write) =>
      request("DELETE", task(userId, taskId), { write: { ...write } }),
    toggleTask: (userId, taskId, write) =>
      request("PATCH", `${task(userId, taskId)}/complete`, { write: { ...write } }),
  };
}

// --- the contract: compile errors here mean the schema no longer matches this client ---------
type Equals<A, B> = (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false;
type Assert<T extends true> = T;
export type _Contract = [
  Assert<Equals<Success<Tasks, "get", 200>, Task[]>>,
  Assert<Equals<Success<Tasks, "post", 201>, Task>>,
  Assert<Equals<Success<OneTask, "get", 200>, Task>>,
  Assert<Equals<Success<OneTask, "put", 200>, Task>>,
  Assert<Equals<Success<OneTask, "patch", 200>, Task>>,
  Assert<Equals<Success<OneTask, "delete", 200>, Task>>,
  Assert<Equals<Success<Toggle, "patch", 200>, Task>>,
  Assert<Equals<StatusFilter, "all" | "pending" | "completed">>,
  Assert<Equals<TaskCreate["title"], string>>,
  Assert<Equals<keyof TaskCreate, "title" | "description" | "completed">>,
  Assert<Equals<keyof TaskPatch, "title" | "description" | "completed">>,
  Assert<Equals<components["schemas"]["ErrorDetail"]["detail"], string>>,
];
