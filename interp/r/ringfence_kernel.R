# The R side of Ringfence's `r` code-interpreter contexts, driven by ringfence_kernel.py's
# _DriverKernel over the framing described there (`<tag> <byte count>\n<bytes>`).
#
# Run as `R --no-echo --no-restore --no-save --vanilla -f ringfence_kernel.R --args <fd>`:
# requests arrive on stdin, replies leave on pipe <fd>; fds 1 and 2 are the kernel's capture
# pipes, so print(), cat(), message() and warnings stream as stdout/stderr messages.
#
# A cell is parsed whole (a syntax error runs nothing) and its top-level expressions are
# evaluated in the global environment in order, as the R console does: each visible value is
# printed, the last one becomes the cell's result instead. The first error ends the cell,
# reported with its condition class as the name, its message as the value and the calls that
# led to it as the traceback. SIGINT (the kernel's interrupt) interrupts the evaluation and is
# caught here, so the session and its state survive it.

local({
  fd <- as.integer(commandArgs(trailingOnly = TRUE)[1])
  path <- paste0("/proc/self/fd/", fd)
  # R can only reopen an inherited descriptor by path: make sure it is the pipe it must be
  # (reopening a regular file for writing would truncate it).
  if (!startsWith(Sys.readlink(path), "pipe:")) {
    message("ringfence: reply descriptor ", fd, " is not a pipe")
    quit(save = "no", status = 2)
  }
  ctl <- file(path, open = "wb")
  input <- file("stdin", open = "rb")

  reply <- function(tag, text = "") {
    body <- charToRaw(enc2utf8(as.character(text)))
    writeBin(charToRaw(paste0(tag, " ", length(body), "\n")), ctl)
    writeBin(body, ctl)
    flush(ctl)
  }

  report <- function(name, value, traceback) {
    flush(stdout())
    flush(stderr())
    reply("ename", name)
    reply("evalue", value)
    reply("etrace", traceback)
  }

  shown <- function(value) paste(utils::capture.output(print(value)), collapse = "\n")

  run <- function(code) {
    exprs <- tryCatch(parse(text = code, keep.source = FALSE), error = function(e) e)
    if (inherits(exprs, "error")) {
      msg <- conditionMessage(exprs)
      report("SyntaxError", msg, paste0("Error: ", msg))
      return(invisible())
    }
    n <- length(exprs)
    for (i in seq_len(n)) {
      calls <- NULL
      outcome <- tryCatch(
        withCallingHandlers(
          withVisible(eval(exprs[[i]], envir = globalenv())),
          error = function(e) calls <<- sys.calls(),
          warning = function(w) {
            message("Warning message:\n", conditionMessage(w))
            invokeRestart("muffleWarning")
          }
        ),
        error = function(e) e,
        interrupt = function(e) e
      )
      if (inherits(outcome, "interrupt")) {
        report("Interrupted", "", "Interrupted")
        return(invisible())
      }
      if (inherits(outcome, "error")) {
        call <- conditionCall(outcome)
        where <- if (is.null(call)) "" else deparse(call)[1]
        # stop() at the top of the cell: its call is this driver's eval, not the user's.
        if (startsWith(where, "eval(exprs[[i]]")) where <- ""
        head <- if (nzchar(where)) paste0("Error in ", where, ": ") else "Error: "
        # The calls from the cell's own code down to the error, without this driver's frames.
        frames <- vapply(calls, function(c) deparse(c)[1], "")
        keep <- which(frames == "eval(exprs[[i]], envir = globalenv())")
        if (length(keep)) frames <- frames[-seq_len(keep[length(keep)])]
        frames <- frames[!grepl("^(h\\(simpleError|\\.handleSimpleError|stop\\()", frames)]
        trace <- paste0(head, conditionMessage(outcome))
        if (length(frames)) {
          trace <- paste0(trace, "\n", paste0(seq_along(frames), ". ", frames, collapse = "\n"))
        }
        report(class(outcome)[1], conditionMessage(outcome), trace)
        return(invisible())
      }
      if (isTRUE(outcome$visible)) {
        if (i == n) {
          text <- tryCatch(shown(outcome$value), error = function(e) conditionMessage(e))
          flush(stdout())
          reply("result", text)
        } else {
          print(outcome$value)
        }
      }
    }
    invisible()
  }

  set_env <- function(pairs) {
    for (kv in strsplit(pairs, "\u0001", fixed = TRUE)[[1]]) {
      if (!nzchar(kv)) next
      eq <- regexpr("=", kv, fixed = TRUE)
      if (eq < 0) {
        Sys.unsetenv(kv)
      } else {
        args <- list(substring(kv, eq + 1))
        names(args) <- substring(kv, 1, eq - 1)
        do.call(Sys.setenv, args)
      }
    }
  }

  reply("ready")
  repeat {
    header <- readLines(input, n = 1, warn = FALSE)
    if (length(header) == 0) quit(save = "no", status = 0)
    parts <- strsplit(header, " ", fixed = TRUE)[[1]]
    size <- as.integer(parts[2])
    body <- if (size > 0) readBin(input, "raw", n = size) else raw(0)
    # R strings cannot hold NUL: the kernel's NUL separators arrive as \001 here.
    body[body == as.raw(0)] <- as.raw(1)
    text <- rawToChar(body)
    Encoding(text) <- "UTF-8"
    if (parts[1] == "env") {
      set_env(text)
    } else if (parts[1] == "exec") {
      run(text)
    }
    flush(stdout())
    flush(stderr())
    reply("done")
  }
})
