// The server's JSON API (contract: qktrace/server/schemas.py). Every call returns the parsed, versioned
// body or throws an Error whose message is one line a person can act on.

export const API_VERSION = 1;

export async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  let res;
  try { res = await fetch(path, opts); } catch (e) { throw new Error(`the server is not reachable (${e.message})`); }
  let data;
  try { data = await res.json(); } catch { throw new Error(`${path}: HTTP ${res.status}, not JSON`); }
  if (!res.ok) throw new Error(data.error || `${path}: HTTP ${res.status}`);
  if (data.version !== API_VERSION) {
    throw new Error(`the server speaks API version ${data.version}; this page reads ${API_VERSION}: reload it`);
  }
  return data;
}

export const info = () => api("/api/info");
export const graphs = () => api("/api/graphs");
export const graph = (name) => api(`/api/graphs/${encodeURIComponent(name)}`);
export const qk = (req) => api("/api/qk", req);
export const sweep = (req) => api("/api/sweep", req);
export const compare = (req) => api("/api/compare", req);
/** A residual-SAE feature (kind "feature", at a checkpoint), or a transcoder / attention-SAE one (at a layer). */
export const feature = (checkpoint, index, kind = "feature") => api(kind === "feature"
  ? `/api/features/${checkpoint}/${index}` : `/api/features/${kind}/${checkpoint}/${index}`);

/** Start a graph build and poll its job every half second; `progress(job)` hears each stage. The saved name. */
export async function buildGraph(prompt, progress) {
  let job = await api("/api/graph", { prompt });
  while (job.status === "running") {
    progress(job);
    await new Promise((r) => setTimeout(r, 500));
    job = await api(`/api/jobs/${job.id}`);
  }
  if (job.status === "error") throw new Error(job.error);
  return job.graph;
}
