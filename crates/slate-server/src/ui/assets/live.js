// slate: live job log. Follows /jobs/{id}/events (server-sent events) and appends the
// rendered lines; the browser's EventSource reconnects by itself and resumes from the
// last byte offset it saw (Last-Event-ID). Without this script the page still works.
(function () {
  'use strict';
  var log = document.getElementById('log');
  if (!log || log.dataset.follow !== '1' || !window.EventSource) return;
  var job = log.dataset.job;
  var next = log.dataset.nextLine ? parseInt(log.dataset.nextLine, 10) : null;
  var status = document.getElementById('live-status');
  var endNote = /: (ok|failed.*|killed by signal.*|timed out.*|could not be started) in [0-9.]+s$/;

  function say(text) { if (status) status.textContent = text; }
  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 60;
  }
  function current() {
    var secs = log.querySelectorAll(':scope > .sec');
    var last = secs[secs.length - 1];
    return last && last.dataset.live === '1' ? last : null;
  }
  function section(name) {
    var d;
    if (name === null) {
      d = document.createElement('div');
      d.className = 'sec pre';
    } else {
      d = document.createElement('details');
      d.className = 'sec step';
      d.open = true;
      d.dataset.name = name;
      var s = document.createElement('summary');
      var b = document.createElement('b');
      b.textContent = name;
      s.append('step ', b);
      d.appendChild(s);
    }
    d.dataset.live = '1';
    log.appendChild(d);
    return d;
  }
  function number(el) {
    var a = el.querySelector('a.n');
    if (next !== null) {
      el.id = 'L' + next;
      if (a) { a.href = '#L' + next; a.textContent = String(next); }
      next += 1;
    } else if (el.dataset.id) {
      el.id = el.dataset.id;
    }
  }
  var refreshTimer = null;
  function refreshSteps() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(function () {
      fetch(location.pathname, { credentials: 'same-origin' })
        .then(function (r) { return r.text(); })
        .then(function (t) {
          var fresh = new DOMParser().parseFromString(t, 'text/html').getElementById('steps');
          var old = document.getElementById('steps');
          if (fresh && old) old.replaceWith(fresh);
        })
        .catch(function () {});
    }, 300);
  }
  function addLines(html) {
    var follow = nearBottom();
    var tpl = document.createElement('template');
    tpl.innerHTML = html;
    Array.prototype.slice.call(tpl.content.children).forEach(function (el) {
      var sec = current();
      var name = el.dataset.stepnote;
      if (name !== undefined) {
        refreshSteps();
        var text = (el.querySelector('.t') || el).textContent;
        if (sec && sec.tagName === 'DETAILS' && sec.dataset.name === name && endNote.test(text)) {
          sec.appendChild(el);
          number(el);
          sec.dataset.live = '0';
          var summary = sec.querySelector('summary');
          if (summary) {
            var out = summary.querySelector('.outcome');
            if (!out) { out = document.createElement('span'); out.className = 'outcome'; summary.append(' ', out); }
            out.textContent = text.slice(text.indexOf(name + ': ') + name.length + 2);
          }
          if (/: ok in [0-9.]+s$/.test(text)) { sec.classList.add('ok'); sec.open = false; }
          else { sec.classList.add('failed'); }
          return;
        }
        if (sec) sec.dataset.live = '0';
        sec = section(name);
      } else if (!sec) {
        sec = section(null);
      }
      sec.appendChild(el);
      number(el);
    });
    if (follow) window.scrollTo(0, document.documentElement.scrollHeight);
  }
  function setState(s) {
    var b = document.getElementById('job-state');
    if (b) { b.textContent = s.state; b.className = 'badge s-' + s.state; }
    var r = document.getElementById('job-reason');
    if (r) r.textContent = s.reason || '';
  }

  var es = new EventSource('/jobs/' + job + '/events?offset=' + log.dataset.offset);
  es.addEventListener('open', function () { say('following the log live'); });
  es.addEventListener('log', function (e) {
    addLines(e.data);
    if (e.lastEventId) log.dataset.offset = e.lastEventId;
  });
  es.addEventListener('state', function (e) { setState(JSON.parse(e.data)); refreshSteps(); });
  es.addEventListener('done', function (e) {
    es.close();
    var s = JSON.parse(e.data);
    setState(s);
    say('job finished: ' + s.state);
    var c = document.getElementById('cancel-form');
    if (c) c.remove();
    refreshSteps();
  });
  es.addEventListener('error', function () {
    if (es.readyState !== EventSource.CLOSED) say('connection lost: reconnecting…');
  });
})();
