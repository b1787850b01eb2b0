// The console's only own script: show an action's refusal (the API's problem+json `detail`) in
// the flash area, go to the sign-in page when the session ended, and show whether the event
// stream is connected.
document.addEventListener("htmx:responseError", (event) => {
  const xhr = event.detail.xhr;
  let detail = xhr.statusText;
  try {
    detail = JSON.parse(xhr.responseText).detail || detail;
  } catch (e) {
    // not problem+json (e.g. an HTML error page of a proxy): the status text will do
  }
  const flash = document.getElementById("flash");
  flash.replaceChildren(Object.assign(document.createElement("p"), { className: "error", textContent: `${xhr.status}: ${detail}` }));
});
document.addEventListener("htmx:sseOpen", () => document.getElementById("live")?.classList.add("on"));
document.addEventListener("htmx:sseError", () => document.getElementById("live")?.classList.remove("on"));
// nginx answers a request without a valid session with a redirect to the sign-in page, which
// htmx would follow and swap into a table: have the whole page go there instead.
document.addEventListener("htmx:beforeSwap", (event) => {
  const url = event.detail.xhr.responseURL || "";
  if (url.endsWith("/console/signin")) {
    event.detail.shouldSwap = false;
    window.location.assign(url);
  }
});
