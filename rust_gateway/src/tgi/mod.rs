//! TGI's API: request bodies and their mapping onto a sampling spec (`request`), and
//! response bodies (`response`). Used by the TGI routes.

mod request;
mod response;

pub use request::{GenerateBody, OutputOptions};
pub use response::{
    BestOfSequence, Details, GenerateResponse, PrefillToken, StreamDetails, StreamResponse,
    TokenInfo, TokenizedToken,
};
