#include "duet/metrics/server_metrics.h"

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>

namespace duet::metrics {

DecodeMetrics::DecodeMetrics(Registry& r)
    : ttft(r.Histogram(kTimeToFirstToken,
                       "Time from a Generate's arrival at decode to its first token written to "
                       "the client (includes prefill and the K/V transfer).",
                       TtftBuckets())),
      inter_token(r.Histogram(kInterTokenLatency,
                              "Time between consecutive tokens of one request.",
                              InterTokenBuckets())),
      e2e(r.Histogram(kE2eRequestLatency, "Time from a Generate's arrival to its final message.",
                      E2eBuckets())),
      queue_time(r.Histogram(kRequestQueueTime,
                             "Time a request ready to decode waited to join the running batch.",
                             WaitBuckets())),
      kv_transfer(r.Histogram(kKvTransferTime,
                              "Time from the first to the last K/V message of a remote prefill.",
                              WaitBuckets())),
      batch_size(r.Histogram(kBatchSize, "Sequences forwarded in one decode engine step.",
                             BatchBuckets())),
      kv_transfer_bytes(r.Counter(kKvTransferBytes, "K/V payload bytes received from prefill.")),
      prompt_tokens(r.Counter(kPromptTokens,
                              "Prompt tokens prefilled for requests, remotely or on decode.")),
      generation_tokens(r.Counter(kGenerationTokens, "Tokens generated.")),
      evictions(r.Counter(kSessionEvictions,
                          "Idle sessions whose K/V was dropped to make room (tokens kept).")),
      running(r.Gauge(kRequestsRunning, "Sequences in the decode engine's running batch.")),
      waiting(r.Gauge(kRequestsWaiting,
                      "Requests admitted and not yet in the running batch (tokenizing, "
                      "prefilling, or queued for a batch slot).")),
      kv_cache_usage(r.Gauge(kKvCacheUsage, "Fraction of the K/V block pool in use (0 to 1).")),
      sessions_prefilling(Registry::Child(
          r.GaugeFamily(kSessions, "Sessions by state."), "state", "prefilling")),
      sessions_decoding(
          Registry::Child(r.GaugeFamily(kSessions, "Sessions by state."), "state", "decoding")),
      sessions_idle(
          Registry::Child(r.GaugeFamily(kSessions, "Sessions by state."), "state", "idle")),
      finished_(r.CounterFamily(kRequestsFinished, "Generate requests finished, by reason.")),
      errors_(r.CounterFamily(kRequestErrors, "Requests that ended with a non-OK status, by code.")) {
  // Every reason's series exists from the start, so rate() has a zero to start from.
  for (const char* reason : {kReasonStop, kReasonLength, kReasonCancelled, kReasonError})
    Registry::Child(finished_, "finished_reason", reason);
  for (int code : ServedErrorCodes()) Registry::Child(errors_, "code", CodeName(code));
}

void DecodeMetrics::Finished(int code, const char* ok_reason) {
  const char* reason = ok_reason;
  if (code == 1 /*CANCELLED*/ || code == 4 /*DEADLINE_EXCEEDED*/) {
    reason = kReasonCancelled;
  } else if (code != 0) {
    reason = kReasonError;
  }
  Registry::Child(finished_, "finished_reason", reason).Increment();
  if (code != 0) Registry::Child(errors_, "code", CodeName(code)).Increment();
}

PrefillMetrics::PrefillMetrics(Registry& r)
    : compute(r.Histogram(kPrefillTime,
                          "Compute time of one prefill job (forward pass and K/V encoding).",
                          PrefillBuckets())),
      queue_time(r.Histogram(kPrefillQueueTime,
                             "Time a prefill job waited in the queue before compute.",
                             WaitBuckets())),
      tokens(r.Counter(kPrefillTokens, "Prompt tokens prefilled.")),
      running(r.Gauge(kPrefillRequestsRunning, "Prefill jobs in the forward pass now running.")),
      waiting(r.Gauge(kPrefillRequestsWaiting, "Prefill jobs queued.")),
      errors_(r.CounterFamily(kRequestErrors, "Requests that ended with a non-OK status, by code.")) {
  for (int code : ServedErrorCodes()) Registry::Child(errors_, "code", CodeName(code));
}

void PrefillMetrics::Error(int code) {
  if (code != 0) Registry::Child(errors_, "code", CodeName(code)).Increment();
}

}  // namespace duet::metrics
