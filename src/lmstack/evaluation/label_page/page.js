"use strict";
const params = new URLSearchParams(location.search);
const token = params.get("token") || "";
let labeller = params.get("labeller") || localStorage.getItem("lmstack-labeller") || "";
let current = null, busy = false;
const $ = (id) => document.getElementById(id);
const headers = () => Object.assign({"Content-Type": "application/json"},
  token ? {"X-Lmstack-Token": token} : {});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function status(text, kind) { const s = $("status"); s.textContent = text;
  s.className = "status" + (kind ? " " + kind : ""); }

// the server may be restarting: try again until it answers (a vote is stored once anyway)
async function call(path, options) {
  for (let attempt = 0; ; attempt++) {
    try {
      const response = await fetch(path, Object.assign({headers: headers()}, options || {}));
      const payload = await response.json();
      if (!response.ok) throw Object.assign(new Error(payload.error), {fatal: true});
      if (attempt) status("Reconnected.", "ok");
      return payload;
    } catch (error) {
      if (error.fatal) throw error;
      status("The server is not answering; retrying…", "warn");
      await sleep(Math.min(500 * (attempt + 1), 3000));
    }
  }
}

function progress(data) {
  const pct = data.total ? 100 * data.done / data.total : 0;
  $("fill").style.width = pct + "%";
  $("count").textContent = data.done + " of " + data.total;
  others(data);
}

function others(data) {
  const names = Object.entries(data.labellers || {}).filter(([n]) => n !== labeller)
    .map(([n, c]) => n + " " + c);
  $("who").innerHTML = "";
  const me = document.createElement("b"); me.textContent = labeller;
  $("who").append("Labeller ", me, names.length ? " · others: " + names.join(", ") : "");
}

async function next() {
  const data = await call("/api/next?labeller=" + encodeURIComponent(labeller));
  progress(data);
  current = data.item;
  if (!current) { $("task").classList.add("hidden"); $("done").hidden = false;
    $("donecount").textContent = data.done + " of " + data.total + " items voted."; return; }
  $("prompt").innerHTML = current.prompt_html;  // rendered and escaped by the server
  $("a_body").innerHTML = current.a_html;
  $("b_body").innerHTML = current.b_html;
  $("a_body").scrollTop = $("b_body").scrollTop = 0;
  $("reason").value = "";
  document.body.dataset.item = current.id;
  $("task").classList.remove("hidden");
}

async function vote(choice) {
  if (!current || busy) return;
  busy = true;
  document.querySelectorAll("button[data-choice]").forEach((b) => b.disabled = true);
  try {
    const body = {labeller, item_id: current.id, choice, order: current.order,
                  reason: $("reason").value};
    const answer = await call("/api/vote", {method: "POST", body: JSON.stringify(body)});
    status(answer.recorded ? "Saved." : "Already saved.", "ok");
    await next();
  } catch (error) { status(error.message, "warn"); }
  finally { busy = false;
    document.querySelectorAll("button[data-choice]").forEach((b) => b.disabled = false); }
}

document.querySelectorAll("button[data-choice]").forEach((b) =>
  b.addEventListener("click", () => vote(b.dataset.choice)));
document.addEventListener("keydown", (event) => {
  if (event.target === $("reason")) {
    if (event.key === "Escape") $("reason").blur();
    return;
  }
  if (event.target.tagName === "INPUT" || event.ctrlKey || event.metaKey || event.altKey) return;
  const keys = {a: "A", b: "B", t: "tie", x: "both_bad", "1": "A", "2": "B", "3": "tie",
                "4": "both_bad"};
  const choice = keys[event.key.toLowerCase()];
  if (choice) { event.preventDefault(); vote(choice); }
  else if (event.key.toLowerCase() === "r") { event.preventDefault(); $("reason").focus(); }
});
$("nameform").addEventListener("submit", (event) => {
  event.preventDefault();
  labeller = $("name").value.trim();
  if (!labeller) return;
  localStorage.setItem("lmstack-labeller", labeller);
  $("nameform").classList.add("hidden");
  next().catch((error) => status(error.message, "warn"));
});
// everyone's counts, now and then (the page's own count changes with each vote)
setInterval(() => { if (labeller && !busy) fetch("/api/progress", {headers: headers()})
  .then((r) => r.ok ? r.json() : null).then((d) => d && others(d)).catch(() => {}); }, 3000);
if (labeller) next().catch((error) => { $("task").classList.remove("hidden");
  status(error.message, "warn"); });
else $("nameform").classList.remove("hidden");
