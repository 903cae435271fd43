// Records script errors, console errors and whether every image decoded into data attributes of the body
// (data-errors, data-images-ok="decoded/total"), so a headless browser's --dump-dom shows them.
// An element marked data-first-screen is measured too: data-first-screen="yes" when it ends within the window.
(function () {
  var errors = [];
  function note(msg) { errors.push(String(msg)); if (document.body) document.body.dataset.errors = errors.join(" | "); }
  window.addEventListener("error", function (e) { note(e.message || ("resource failed: " + (e.target && e.target.src))); }, true);
  window.addEventListener("unhandledrejection", function (e) { note("unhandled rejection: " + e.reason); });
  var consoleError = console.error;
  console.error = function () { note(Array.prototype.join.call(arguments, " ")); consoleError.apply(console, arguments); };
  window.addEventListener("load", function () {
    var imgs = document.images, ok = 0;
    for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
    document.body.dataset.imagesOk = ok + "/" + imgs.length;
    var first = document.querySelector("[data-first-screen]");
    if (first) {
      document.body.dataset.firstScreen = first.getBoundingClientRect().bottom <= window.innerHeight ? "yes" : "no";
    }
    document.body.dataset.errors = errors.join(" | ");
  });
})();
