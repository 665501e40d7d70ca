// Live updates for the status page: server-sent events replace the
// pieces the server re-renders; a local one-second tick moves the
// "time in state" and countdown figures. No polling of the server.
"use strict";
(function () {
  var root = document.documentElement;
  var skew = (+root.dataset.now || Date.now()) - Date.now();
  var link = document.getElementById("link");
  function fmt(s) {
    s = Math.max(0, Math.floor(s));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
    return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
  }
  function tick() {
    var now = Date.now() + skew, i, t;
    t = document.querySelectorAll("[data-since]");
    for (i = 0; i < t.length; i++) t[i].textContent = fmt((now - +t[i].dataset.since) / 1000);
    t = document.querySelectorAll("[data-until]");
    for (i = 0; i < t.length; i++) t[i].textContent = fmt((+t[i].dataset.until - now) / 1000);
  }
  function setLink(state) {
    link.textContent = state;
    link.className = state;
    root.dataset.link = state;
  }
  tick();
  setInterval(tick, 1000);
  if (!window.EventSource) return;
  var me = document.currentScript;
  // Only what changed after the revisions this page was rendered with.
  var es = new EventSource((me && me.dataset.events) || ("events?after=" + (root.dataset.rev || 0)));
  es.addEventListener("link", function (e) {
    var d = JSON.parse(e.data);
    skew = d.now - Date.now();
    setLink(d.state);
  });
  es.addEventListener("zone", function (e) {
    var d = JSON.parse(e.data), old = document.getElementById(d.id);
    if (old) {
      // Catch-up after a reconnect resends what the page has: keep the newer.
      if (+old.dataset.rev >= d.rev) return;
      old.outerHTML = d.html;
    } else {
      var list = document.getElementById(d.list);
      if (list) list.insertAdjacentHTML("beforeend", d.html);
      // A zone new to this page can be held from the form too.
      var sel = document.querySelector("#override select[name=zone]");
      if (sel && d.key && !Array.prototype.some.call(sel.options, function (o) { return o.value === d.key; })) {
        sel.add(new Option(d.key, d.key));
      }
    }
    tick();
  });
  es.addEventListener("gone", function (e) {
    var d = JSON.parse(e.data), old = document.getElementById(d.id);
    if (old && +old.dataset.rev < d.rev) old.remove();
  });
  es.addEventListener("health", function (e) {
    var old = document.getElementById("health");
    if (old) old.outerHTML = e.data;
    tick();
  });
  // The fleet page: a whole section re-rendered (the table, a site's zones).
  es.addEventListener("section", function (e) {
    var d = JSON.parse(e.data), old = document.getElementById(d.id);
    if (old) old.outerHTML = d.html;
    tick();
  });
  // The bucket was recreated: revisions start over, load afresh.
  es.addEventListener("reset", function () { location.reload(); });
  es.onerror = function () { setLink("reconnecting"); };
})();
