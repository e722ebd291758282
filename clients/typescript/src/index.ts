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
 * Any non-2xx answer. `status` tells what to do:
 * 401 sign in again (token missing, invalid or expired; refresh it and retry once),
 * 403 the path's user is not the token's, 404 no such task (or not yours),
 * 413 body too large, 422 invalid input (`problems`), 503 retry after `retryAfter` seconds.
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
}

export interface TodoApi {
  listTasks(userId: string, status?: StatusFilter): Promise<Success<Tasks, "get", 200>>;
  createTask(userId: string, task: TaskCreate): Promise<Success<Tasks, "post", 201>>;
  getTask(userId: string, taskId: number): Promise<Success<OneTask, "get", 200>>;
  /** PUT: `title` required; fields left out keep their value. */
  replaceTask(
    userId: string,
    taskId: number,
    task: TaskReplace,
  ): Promise<Success<OneTask, "put", 200>>;
  /** PATCH: any subset; `description: null` clears it. */
  updateTask(userId: string, taskId: number, changes: TaskPatch): Promise<Success<OneTask, "patch", 200>>;
  /** Resolves to the task as it was before deletion. */
  deleteTask(userId: string, taskId: number): Promise<Success<OneTask, "delete", 200>>;
  toggleTask(userId: string, taskId: number): Promise<Success<Toggle, "patch", 200>>;
}

export function createTodoApi(options: TodoApiOptions): TodoApi {
  const base = options.baseUrl.replace(/\/+$/, "");
  const doFetch = options.fetch ?? fetch;

  async function request<T>(
    method: string,
    path: string,
    body?: unknown,
    query?: Record<string, string>,
  ): Promise<T> {
    const url = new URL(base + path);
    for (const [key, value] of Object.entries(query ?? {})) url.searchParams.set(key, value);
    const headers: Record<string, string> = {
      Authorization: `Bearer ${await options.getToken()}`,
      Accept: "application/json",
    };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const init: RequestInit = { method, headers };
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await doFetch(url, init);
    const payload: unknown = await response.json().catch(() => null);
    if (!response.ok) {
      const detail =
        payload !== null && typeof payload === "object" && "detail" in payload
          ? (payload as { detail: string | ValidationProblem[] }).detail
          : response.statusText || `HTTP ${response.status}`;
      throw new ApiError(response.status, detail, response.headers);
    }
    return payload as T;
  }

  const tasks = (userId: string) => `/api/${encodeURIComponent(userId)}/tasks`;
  const task = (userId: string, taskId: number) => `${tasks(userId)}/${taskId}`;

  return {
    listTasks: (userId, status) =>
      request("GET", tasks(userId), undefined, status === undefined ? undefined : { status }),
    createTask: (userId, body) => request("POST", tasks(userId), body),
    getTask: (userId, taskId) => request("GET", task(userId, taskId)),
    replaceTask: (userId, taskId, body) => request("PUT", task(userId, taskId), body),
    updateTask: (userId, taskId, body) => request("PATCH", task(userId, taskId), body),
    deleteTask: (userId, taskId) => request("DELETE", task(userId, taskId)),
    toggleTask: (userId, taskId) => request("PATCH", `${task(userId, taskId)}/complete`),
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
