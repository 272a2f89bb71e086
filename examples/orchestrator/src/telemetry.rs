//! Logs and traces of `serve` and `agent`: log lines on stderr (`ORCH_LOG_FORMAT=json`: one JSON object
//! per line, with the current span's fields such as the request id and trace id), and OpenTelemetry
//! traces exported over OTLP/HTTP (protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, with the standard `OTEL_*` variables and the service
//! name `orchestrator` (`OTEL_SERVICE_NAME` overrides it). W3C trace context crosses HTTP both ways.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::OnceLock;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Flushes the exporter when dropped (spans still in the batch are sent).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("warning: could not flush the traces: {e}");
            }
        }
    }
}

/// The OTLP exporter's HTTP client: reqwest's blocking client, on the exporter's own thread (so no async
/// runtime is needed there), trusting `ORCH_CA_FILE` too.
#[derive(Debug, Default)]
struct OtlpClient {
    client: OnceLock<Result<reqwest::blocking::Client, String>>,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<opentelemetry_http::Response<opentelemetry_http::Bytes>, opentelemetry_http::HttpError> {
        let client = self
            .client
            .get_or_init(|| {
                let mut b =
                    reqwest::blocking::Client::builder().use_rustls_tls().timeout(std::time::Duration::from_secs(10));
                for c in crate::tls::extra_roots()? {
                    b = b.add_root_certificate(c);
                }
                b.build().map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| e.clone())?;
        let (parts, body) = request.into_parts();
        let resp =
            client.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body.to_vec()).send()?;
        let status = resp.status();
        let body = resp.bytes()?;
        let mut out = opentelemetry_http::Response::new(body);
        *out.status_mut() = status;
        Ok(out)
    }
}

fn otlp_configured() -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()))
}

/// Sets up logging and, when configured, trace export. Keep the returned value alive until exit.
pub fn init() -> Telemetry {
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("ORCH_LOG_FORMAT").is_ok_and(|v| v.trim().eq_ignore_ascii_case("json"));
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr).boxed()
    };
    let mut error = None;
    let provider = if otlp_configured() {
        use opentelemetry_otlp::WithHttpConfig;
        match opentelemetry_otlp::SpanExporter::builder().with_http().with_http_client(OtlpClient::default()).build() {
            Ok(exporter) => {
                let name = std::env::var("OTEL_SERVICE_NAME").ok().filter(|n| !n.trim().is_empty());
                let resource = opentelemetry_sdk::Resource::builder()
                    .with_service_name(name.unwrap_or_else(|| "orchestrator".to_string()))
                    .build();
                Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
            }
            Err(e) => {
                error = Some(format!("cannot set up the OTLP trace exporter: {e}"));
                None
            }
        }
    } else {
        None
    };
    let otel = provider.as_ref().map(|p| {
        // Spans only from the orchestrator's own code (not every dependency's).
        let only_ours = tracing_subscriber::filter::filter_fn(|m| {
            m.target().starts_with("orchestrator") || m.target().starts_with("otel")
        });
        tracing_opentelemetry::layer().with_tracer(p.tracer("orchestrator")).with_filter(only_ours)
    });
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init();
    if let Some(e) = error {
        tracing::warn!("{e}");
    } else if provider.is_some() {
        tracing::info!("exporting traces over OTLP/HTTP");
    }
    Telemetry { provider }
}
