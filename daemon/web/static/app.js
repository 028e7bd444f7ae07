// stepd web pages: relative times, confirm prompts, and the live workflow page.
"use strict";

function relative(ms) {
  const delta = (Date.now() - ms) / 1000, s = Math.abs(delta);
  if (s < 10) return "just now";
  let text;
  if (s < 60) text = Math.floor(s) + " s";
  else if (s < 3600) text = Math.floor(s / 60) + " min";
  else if (s < 86400) text = Math.floor(s / 3600) + " h";
  else if (s < 30 * 86400) text = Math.floor(s / 86400) + " d";
  else return new Date(ms).toLocaleDateString();
  return delta > 0 ? text + " ago" : "in " + text;
}

function refreshTimes(root) {
  for (const el of root.querySelectorAll("time[data-ms]")) {
    const ms = Number(el.dataset.ms);
    el.textContent = relative(ms);
    el.title = new Date(ms).toLocaleString();
  }
}

// Forms with data-confirm on their button ask first.
document.addEventListener("submit", (event) => {
  const button = event.submitter;
  if (button && button.dataset.confirm && !window.confirm(button.dataset.confirm)) {
    event.preventDefault();
  }
});

// The workflow page: follow its event stream and swap in the fresh page's #live part.
function follow(live) {
  const source = new EventSource(live.dataset.events);
  let busy = false, again = false;
  async function reload() {
    if (busy) { again = true; return; }
    busy = true;
    try {
      const response = await fetch(location.pathname, { headers: { Accept: "text/html" } });
      if (response.redirected || !response.ok) { source.close(); return; }
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.getElementById("live");
      const current = document.getElementById("live");
      if (!fresh || !current) return;
      current.replaceChildren(...fresh.childNodes);
      current.dataset.status = fresh.dataset.status;
      const count = page.getElementById("inbox-count"), mine = document.getElementById("inbox-count");
      if (mine) mine.textContent = count ? count.textContent : "";
      refreshTimes(current);
      if (!fresh.dataset.events) source.close();  // finished: nothing more will come
    } finally {
      busy = false;
      if (again) { again = false; reload(); }
    }
  }
  source.onmessage = reload;
  source.onerror = () => { if (source.readyState === EventSource.CLOSED) source.close(); };
}

document.addEventListener("DOMContentLoaded", () => {
  refreshTimes(document);
  setInterval(() => refreshTimes(document), 15000);
  const live = document.getElementById("live");
  if (live && live.dataset.events) follow(live);
});
